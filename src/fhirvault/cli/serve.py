"""``fhirvault serve``: initialise on first run, then serve with uvicorn (TLS 1.2+ when configured)."""

from __future__ import annotations

import logging
import ssl
import sys

import uvicorn

from fhirvault.config import Settings
from fhirvault.logs import configure

log = logging.getLogger("fhirvault.serve")


def serve(settings: Settings) -> int:
    from fhirvault.bootstrap import initialise, is_initialised
    from fhirvault.container import build
    from fhirvault.web.app import create_app

    configure(settings.log_level)
    if not is_initialised(settings):
        path = initialise(settings)
        print(f"Initialised {settings.data_dir}; admin client credentials written to {path}", file=sys.stderr)
    container = build(settings)
    app = create_app(container)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        server_header=False,
        proxy_headers=False,
        lifespan="on",
        ssl_certfile=str(settings.tls_cert) if settings.tls_cert else None,
        ssl_keyfile=str(settings.tls_key) if settings.tls_key else None,
        timeout_graceful_shutdown=10,
    )
    config.load()
    if config.ssl is not None:
        # TLS 1.2 minimum, forward-secret AEAD suites only for 1.2 (1.3 suites are all AEAD).
        config.ssl.minimum_version = ssl.TLSVersion.TLSv1_2
        config.ssl.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")
    server = uvicorn.Server(config)
    scheme = "https" if settings.tls_cert else "http"
    log.info("serving", extra={"url": f"{scheme}://{settings.host}:{settings.port}/fhir"})
    server.run()
    return 0
