"""Stamen (and Flower) configuration: every option, commented out at its default.

Save as flowerconfig.py in the directory Stamen starts in, or point to it with --conf.
The file is executed as Python: every top-level name that is an option is used (dashes
and underscores alike), everything else is ignored, so imports and helper code are fine.
Precedence, as in Flower: command line > this file > FLOWER_<NAME> variables > defaults.

Secrets (passwords, OAuth secrets, tokens, broker passwords) do not belong in this file:
read them from the environment, as the examples below do, and keep the environment file
readable by the service user only. A Flower flowerconfig.py loads unchanged.

Generated from Stamen's option registry by `python -m stamen.docs_generate`.
"""

import os  # noqa: F401 - the examples below read secrets from the environment


# --- Flower options ----------------------------------------------------------------------------

# run on the given port. Type int, default 5555; env FLOWER_PORT.
# port = 5555

# run on the given address. Type str, default ''; env FLOWER_ADDRESS.
# address = ''

# path to unix socket to bind. Type str, default ''; env FLOWER_UNIX_SOCKET.
# unix_socket = ''

# run in debug mode. Type bool, default false; env FLOWER_DEBUG.
# debug = False

# inspect timeout (in milliseconds). Type float, default 1000; env FLOWER_INSPECT_TIMEOUT.
# inspect_timeout = 1000.0

# regexp of emails to grant access. Type str, default ''; env FLOWER_AUTH.
# auth = ''
# auth = r".*@example\.com"

# enable http basic authentication. Type list of str, default none; env FLOWER_BASIC_AUTH.
# basic_auth = []
# basic_auth = os.environ["STAMEN_BASIC_AUTH"].split(",")  # user:password or user:$2b$... (bcrypt)

# OAuth2 key (requires --auth). Type str, default none; env FLOWER_OAUTH2_KEY.
# oauth2_key = None

# OAuth2 secret (requires --auth). Type str, default none; env FLOWER_OAUTH2_SECRET.
# oauth2_secret = None
# oauth2_secret = os.environ["FLOWER_OAUTH2_SECRET"]

# OAuth2 redirect uri (requires --auth). Type str, default none; env
#   FLOWER_OAUTH2_REDIRECT_URI.
# oauth2_redirect_uri = None

# maximum number of workers to keep. Type int, default 5000; env FLOWER_MAX_WORKERS.
# max_workers = 5000

# maximum number of tasks to keep in the history. Type int, default 100000; env
#   FLOWER_MAX_TASKS.
# max_tasks = 100000

# history database: a SQLite file (<db>.sqlite3 unless it ends in .db, .sqlite or
#   .sqlite3) or a postgresql:// URL. Type str, default flower; env FLOWER_DB.
# db = 'flower'

# keep the history in --db across restarts (else a temporary file). Type bool, default
#   false; env FLOWER_PERSISTENT.
# persistent = False

# accepted from Flower configs; Stamen commits every --commit_interval instead. Type int,
#   default 0; env FLOWER_STATE_SAVE_INTERVAL.
# state_save_interval = 0

# inspect broker e.g. http://guest:guest@localhost:15672/api/. Type str, default none; env
#   FLOWER_BROKER_API.
# broker_api = None
# broker_api = os.environ["STAMEN_BROKER_API"]  # http://user:password@rabbit:15672/api/

# SSL certificate authority (CA) file. Type str, default none; env FLOWER_CA_CERTS.
# ca_certs = None

# SSL certificate file. Type str, default none; env FLOWER_CERTFILE.
# certfile = None

# SSL key file. Type str, default none; env FLOWER_KEYFILE.
# keyfile = None

# enable support for the 'X-Real-Ip' and 'X-Scheme' headers.. Type bool, default false;
#   env FLOWER_XHEADERS.
# xheaders = False

# refresh workers. Type bool, default true; env FLOWER_AUTO_REFRESH.
# auto_refresh = True

# time (in seconds) after which offline workers are purged from workers. Type int, default
#   none; env FLOWER_PURGE_OFFLINE_WORKERS.
# purge_offline_workers = None

# secure cookie secret. Type str, default random, new for every start; env
#   FLOWER_COOKIE_SECRET.
# cookie_secret = None
# cookie_secret = os.environ["STAMEN_COOKIE_SECRET"]  # set it to keep logins across restarts

# configuration file. Type str, default flowerconfig.py; env FLOWER_CONF.
# (--conf names this file; default 'flowerconfig.py')

# periodically enable Celery events. Type bool, default true; env FLOWER_ENABLE_EVENTS.
# enable_events = True

# use custom task formatter. Type callable, default none; this file only.
# def format_task(task):
#     """Called with a copy of each task shown on the task page and the tasks table;
#     return it changed. Not applied to the API. An exception shows the task unchanged."""
#     task.args = task.args[:200]
#     return task

# show time in relative format. Type bool, default false; env FLOWER_NATURAL_TIME.
# natural_time = False

# slugs of columns on /tasks/ page in display order, delimited by comma. Type list of str,
#   default name,uuid,state,received,runtime,worker; env FLOWER_TASKS_COLUMNS.
# tasks_columns = ['name', 'uuid', 'state', 'received', 'runtime', 'worker']

# auth handler class. Type str, default none; env FLOWER_AUTH_PROVIDER.
# auth_provider = None

# base url prefix. Type str, default none; env FLOWER_URL_PREFIX.
# url_prefix = None
# url_prefix = "flower"  # served at https://host/flower/

# histogram latency bucket value. Type list of float, default
#   0.005,0.01,0.025,0.05,0.075,0.1,0.25,0.5,0.75,1,2.5,5,7.5,10,inf; env
#   FLOWER_TASK_RUNTIME_METRIC_BUCKETS.
# task_runtime_metric_buckets = [
#     0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
#     float("inf"),
# ]

# enable read only mode, disabling all operations. Type bool, default false; env
#   FLOWER_READ_ONLY.
# read_only = False


# --- Logging options ---------------------------------------------------------------------------

# log level: debug, info, warning, error or none (none leaves logging alone). Type str,
#   default info; env FLOWER_LOGGING.
# logging = 'info'

# log to stderr; by default only when no --log_file_prefix is given. Type bool, default
#   auto; env FLOWER_LOG_TO_STDERR.
# log_to_stderr = None

# write the log to this file (rotated by size or time: --log_rotate_mode). Type str,
#   default none; env FLOWER_LOG_FILE_PREFIX.
# log_file_prefix = None

# rotate the log file at this many bytes (--log_rotate_mode=size). Type int, default
#   100000000; env FLOWER_LOG_FILE_MAX_SIZE.
# log_file_max_size = 100000000

# number of rotated log files to keep. Type int, default 10; env
#   FLOWER_LOG_FILE_NUM_BACKUPS.
# log_file_num_backups = 10

# rotate the log file by size or by time. Type str, default size; env
#   FLOWER_LOG_ROTATE_MODE.
# log_rotate_mode = 'size'

# with --log_rotate_mode=time, the unit of --log_rotate_interval: S, M, H, D, midnight or
#   W0-W6 (a weekday, Monday first). Type str, default midnight; env
#   FLOWER_LOG_ROTATE_WHEN.
# log_rotate_when = 'midnight'

# with --log_rotate_mode=time, rotate every this many --log_rotate_when units. Type int,
#   default 1; env FLOWER_LOG_ROTATE_INTERVAL.
# log_rotate_interval = 1


# --- Stamen options ----------------------------------------------------------------------------

# forget tasks older than this: seconds, or a duration such as 30m, 12h, 7d. Type
#   duration, default no age limit, only --max_tasks; env FLOWER_MAX_TASK_AGE.
# max_task_age = None
# max_task_age = "7d"

# seconds an event may wait in Stamen's RabbitMQ event queue before the broker drops it;
#   longer than Celery's loses fewer events when Stamen falls behind. Type float, default
#   Celery's event_queue_ttl, 5 s; env FLOWER_EVENT_QUEUE_TTL.
# event_queue_ttl = None

# bound on Stamen's RabbitMQ event queue, in messages (the oldest are dropped beyond it).
#   Type int, default unbounded; env FLOWER_EVENT_QUEUE_MAX_LENGTH.
# event_queue_max_length = None

# seconds between commits of ingested events; a crash loses at most this much. Type float,
#   default 1; env FLOWER_COMMIT_INTERVAL.
# commit_interval = 1.0

# events received but not yet stored beyond which receiving waits for storing to catch up
#   (bounds memory; meanwhile events wait in the broker, see docs/performance.md); 0 for
#   no bound. Type int, default 100000; env FLOWER_MAX_PENDING_EVENTS.
# max_pending_events = 100000

# on Redis, read events straight from pub/sub (same events as kombu's path, several times
#   cheaper). Type bool, default true; env FLOWER_EVENT_FAST_PATH.
# event_fast_path = True

# PostgreSQL connections this instance's pages and API share (the ingest writer and its
#   election lock hold two more); keep instances x (this + 2) under the server's
#   max_connections. Type int, default 10; env FLOWER_DB_POOL_SIZE.
# db_pool_size = 10

# seconds between lookups in the result backend of tasks not heard finishing (their events
#   were missed), also done at start; 0 disables. Type float, default 60; env
#   FLOWER_BACKFILL_INTERVAL.
# backfill_interval = 60.0

# also export celery-exporter's metric family (celery_task_sent_total, celery_worker_up,
#   ...) on /metrics. Type bool, default false; env FLOWER_CELERY_EXPORTER_METRICS.
# celery_exporter_metrics = False

# who gets the admin role (everything, worker shutdown included): basic-auth users, emails
#   or --auth-style patterns, group:<OIDC group>; with no role list set every
#   authenticated user is admin, as in Flower. Type list of str, default none; env
#   FLOWER_ADMINS.
# admins = []
# admins = ["alice@example.com"]

# who gets the operator role (task actions, queue pause/purge, worker pool and consumers);
#   same entries as --admins. Type list of str, default none; env FLOWER_OPERATORS.
# operators = []
# operators = ["group:ops"]

# who gets the viewer role (sees everything, changes nothing); once a role list is set,
#   authenticated users on no list are viewers. Type list of str, default none; env
#   FLOWER_VIEWERS.
# viewers = []
# viewers = [".*@example.com"]

# bearer tokens for API clients, name:token[:role]; token may be sha256:<hex digest>. Type
#   list of str, default none; env FLOWER_API_TOKENS.
# api_tokens = []
# api_tokens = [f"ci:{os.environ['STAMEN_CI_TOKEN']}:operator"]

# OpenID Connect issuer URL (or its /.well-known/openid-configuration URL) for
#   --auth_provider=oidc. Type str, default none; env FLOWER_OAUTH2_ISSUER.
# oauth2_issuer = None


# --- Stamen extensions (Flower ignores these) ------------------------------------------------

# Custom pages and API routes: see docs/extending.md and
# deploy/examples/flowerconfig_custom_page.py.
#
# def stamen_routes(router, services):
#     @router.get("/my-dashboard")
#     async def my_dashboard(request): ...
