"""Typed application keys: everything a handler reaches through the app."""

from __future__ import annotations

import aiohttp
from aiohttp import web
from psycopg_pool import AsyncConnectionPool

from ..ingest.authbatch import AuthBatcher
from ..ingest.pipeline import ChannelCache
from ..mqtt.side import MqttSide
from ..reports.runner import Renderer
from ..settings import Config
from ..status.health import HEALTH as HEALTH  # made beside its registry
from ..status.monitor import StatusMonitor
from ..status.observe import Observer
from ..storage.batcher import BatchWriter
from ..tokens import Verifier
from ..web.mail import LoginMailer
from .requestlog import RequestLog

CONFIG = web.AppKey("config", Config)
POOL = web.AppKey("pool", AsyncConnectionPool)
VERIFIER = web.AppKey("verifier", Verifier)
REQUEST_LOG = web.AppKey("request_log", RequestLog)
DSN = web.AppKey("dsn", str)
WRITER = web.AppKey("writer", BatchWriter)
CHANNELS = web.AppKey("ingest_channels", ChannelCache)  # HTTP ingest's devices' channels
AUTHS = web.AppKey("ingest_auths", AuthBatcher)  # HTTP ingest's token statements, shared
MQTT = web.AppKey("mqtt", MqttSide)
OBSERVER = web.AppKey("status_observer", Observer)
STATUS = web.AppKey("status_monitor", StatusMonitor)
ALARMS_HTTP = web.AppKey("alarms_http", aiohttp.ClientSession)  # the notifier's client
LOGIN_MAILER = web.AppKey("login_mailer", LoginMailer)  # the dashboard's sign-in mail
REPORTS = web.AppKey("reports", Renderer)  # the report renderer (queue and files)

# per-request keys (request[...] = ...)
REQUEST_ID = web.RequestKey("request_id", str)
LOG_ACCOUNT = web.RequestKey("log_account", str)
LOG_DEVICE = web.RequestKey("log_device", str)
ACTOR = web.RequestKey("actor", str)  # the API token id behind a management request (audit)
PRE_SESSION = web.RequestKey("pre_session", str)  # a new pre-session cookie (web/routes.py)
