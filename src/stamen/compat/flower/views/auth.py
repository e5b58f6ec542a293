"""Stand-in for ``flower.views.auth``: the built-in login handler names.

Configuration files name these in ``auth_provider`` (usually as strings, see
``stamen.config.resolve_auth_provider``) or import them. Each placeholder records the Stamen
provider it stands for in ``stamen_provider``.
"""

from __future__ import annotations

from . import BaseHandler


class GoogleAuth2LoginHandler(BaseHandler):
    """Google OAuth2 login (Stamen provider ``google``)."""

    stamen_provider = "google"


class GithubLoginHandler(BaseHandler):
    """GitHub OAuth login (Stamen provider ``github``)."""

    stamen_provider = "github"


class GitLabLoginHandler(BaseHandler):
    """GitLab OAuth login (Stamen provider ``gitlab``)."""

    stamen_provider = "gitlab"


class OktaLoginHandler(BaseHandler):
    """Okta OAuth login (Stamen provider ``okta``)."""

    stamen_provider = "okta"
