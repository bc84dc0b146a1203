"""Superset's configuration for the end-to-end test (SUPERSET_CONFIG_PATH points here).

Everything Superset keeps goes to CONSENTRY_SUPERSET_HOME, a fresh temporary directory: the
SQLite metadata database and the secret key. Nothing leaves the machine.
"""

import os

_home = os.environ["CONSENTRY_SUPERSET_HOME"]

SECRET_KEY = os.environ["SUPERSET_SECRET_KEY"]
SQLALCHEMY_DATABASE_URI = f"sqlite:///{_home}/superset.db"
DATA_DIR = _home

# A test server on localhost: no CSP headers, no CSRF tokens for the REST calls, no rate limits,
# no telemetry, no examples.
TALISMAN_ENABLED = False
WTF_CSRF_ENABLED = False
RATELIMIT_ENABLED = False
AUTH_RATE_LIMITED = False
SHOW_STACKTRACE = True
ENABLE_PROXY_FIX = False
LOGO_TARGET_PATH = None
SCHEDULED_QUERIES = {}
FEATURE_FLAGS = {"ENABLE_TEMPLATE_PROCESSING": False}

# Every chart query reaches the broker (no cache in front of it): the test checks what the broker
# answers, not a cached copy.
DATA_CACHE_CONFIG = {"CACHE_TYPE": "NullCache"}
CACHE_CONFIG = {"CACHE_TYPE": "NullCache"}
