"""Stand-in for ``flower.utils``; the helpers configuration files use live in ``template``."""
