"""ASGI entry point: `uvicorn service.main:app`."""

from service.app import create_app
from service.logs import configure_logging
from service.settings import get_settings

_settings = get_settings()
configure_logging(_settings.log_level, _settings.log_json)
app = create_app(_settings)
