"""The Ray Serve deployment: one replica owns one engine and serves the REST app.

Ray Serve's `@serve.ingress` wants FastAPI, so the replica's `__call__` hands
every HTTP request to the starlette app instead: it returns a Response whose
ASGI call runs the app on the request's own scope/receive/send. Streams,
status codes and client disconnects then behave exactly as under uvicorn.

If the engine's tensor-parallel worker processes die, the replica rebuilds its
engine itself (see `ServingEngine`); `check_health` fails only when that rebuild
fails (or, at tp = 1, once the engine died), and Ray Serve then replaces the replica.
"""
from __future__ import annotations

import asyncio
import functools
import importlib
import logging
from pathlib import Path
from typing import Any, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from tpserve.engine.errors import ConfigError

from .openai_api import build_api_app
from .serve_config import ServeConfig
from .serving_engine import ServingEngine, from_llm

logger = logging.getLogger(__name__)

EngineFactory = Callable[[ServeConfig], ServingEngine]


def llm_engine_factory(config: ServeConfig) -> ServingEngine:
    """The default: the tpserve engine in this process (tp ranks as its executor places them).
    With tp > 1 an engine whose worker processes die is rebuilt from the same workspace and
    options; with tp = 1 a failed step may have left this process's device state broken,
    so the engine stays dead and Ray Serve replaces the replica."""
    from tpserve.engine.llm import LLM

    options = dict(config.engine_options)
    options.setdefault("max_batch_size", config.instance_num)
    llm = LLM(config.model, tp=config.tp, model_name=config.model_name, **options)
    # the workspace, not config.model: a Hugging Face model is not converted again
    make_llm = functools.partial(LLM, llm.workspace, tp=config.tp, model_name=config.model_name,
                                 **options)
    rebuild = LLMRebuilder(llm, make_llm) if llm.meta.tp > 1 else None
    return from_llm(llm, served_model_id(config, llm.model_name), rebuild)


class LLMRebuilder:
    """The serving engine's `rebuild` for an LLM: shuts the dead one down (its executor
    and worker processes), then builds another; runs in a worker thread."""

    def __init__(self, llm: Any, make_llm: Callable[[], Any]) -> None:
        self.llm = llm  # the current one
        self.make_llm = make_llm

    def __call__(self) -> Any:
        try:
            self.llm.shutdown()
        except Exception:  # noqa: BLE001 - a dead executor may fail to stop; it is replaced anyway
            logger.warning("shutting the dead engine down failed", exc_info=True)
        self.llm = self.make_llm()
        return self.llm.async_engine()


def served_model_id(config: ServeConfig, template_name: str | None) -> str:
    """The `model` clients send: --model-name, else the workspace's model name, else the folder's."""
    if config.model_name:
        return config.model_name
    if template_name and template_name != "auto":
        return template_name
    return Path(config.model).name if config.model else "tpserve-demo"


def load_factory(path: str) -> EngineFactory:
    """`package.module:function` -> the function."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"engine_factory must look like 'package.module:function', got {path!r}")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot import engine_factory {path!r}: {exc}") from exc


class _ASGIAppResponse(Response):
    """A Response that runs a whole ASGI app (Ray Serve awaits it with the request's ASGI args)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


class TpserveDeployment:
    """The user class of the Serve deployment (decorated in `app.build_app`)."""

    async def __init__(self, config: ServeConfig) -> None:
        # Serve awaits an async constructor. Loading the model takes minutes; it runs
        # in a thread so the replica's event loop, which also answers Serve's control
        # calls (serve_env.REPLICA_ENV puts our code on it), stays free.
        self.config = config
        self.serving = await asyncio.to_thread(load_factory(config.engine_factory), config)
        self.app = build_api_app(self.serving, config.api_options())
        logger.info("tpserve replica serving %s", self.serving.model_id)

    async def __call__(self, request: Request) -> Response:
        return _ASGIAppResponse(self.app)

    async def check_health(self) -> None:
        await self.serving.check_health()

    async def __del__(self) -> None:
        # Ray Serve awaits this on graceful shutdown, after in-flight requests drained
        await self.serving.shutdown()
