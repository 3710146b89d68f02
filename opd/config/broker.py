"""The broker section: a tagged union with one class per broker, selected by `broker.type`.

This is the only module of opd/config that names broker types. What the rest of the config needs to know about a
broker is a class attribute of its section (e.g. `embedded_process`), so no other check compares type strings.
A new broker adds its section class here and to `BROKER_SECTIONS`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal, get_args
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from opd.config.base import Strict


class _BrokerCommon(Strict):
    # True when the launcher starts the broker as a process of the run (so it reserves CPUs and a port there);
    # False when the broker is a server the run only connects to.
    embedded_process: ClassVar[bool]

    max_depth: int | None = Field(
        None,
        ge=1,
        description="A work stream never holds more than this many unfinished entries; producers wait for room. "
        "At least learner.batch_size (a batch stays pending until its step). Unset: learner.batch_size (one batch queued per stream keeps samples within the default "
        "learner.max_staleness; several batches would have most trained at the limit).",
    )
    control_maxlen: int = Field(
        10000, ge=16, description="Fan-out streams keep only this many newest entries."
    )
    request_timeout_s: float = Field(
        30.0,
        gt=0,
        description="A broker that does not answer for this long is dead (each read or connect waits up to a third of it, at least 5 s, and is retried).",
    )
    max_message_mb: float = Field(64.0, gt=0, description="Larger messages are refused (dead-lettered).")


class ZmqBrokerConfig(_BrokerCommon):
    """Embedded broker: one small process holding bounded in-memory streams; no server to install."""

    embedded_process: ClassVar[bool] = True
    type: Literal["zmq"] = "zmq"
    host: str = Field("127.0.0.1", description="Bind/connect address; 127.0.0.1 keeps it off the network.")
    port: int = Field(0, ge=0, le=65535, description="0 = the launcher picks a free port.")


class RedisBrokerConfig(_BrokerCommon):
    """Redis Streams: durable, redelivers a dead worker's entries, lets components on many hosts join one run."""

    embedded_process: ClassVar[bool] = False
    type: Literal["redis"] = "redis"
    url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="redis:// or rediss:// (TLS) URL, with user:password@ for auth; the run id prefixes every stream.",
    )
    claim_idle_s: float = Field(
        30.0,
        gt=0,
        description="An entry whose consumer died, was stopped or gave it back is redelivered to a live consumer after "
        "it has been idle this long; a live consumer keeps what it holds (refreshed every claim_idle_s/3).",
    )
    max_deliveries: int = Field(
        3, ge=1, description="An entry delivered this many times without being acknowledged is dead-lettered."
    )
    tls_ca_file: Path | None = Field(
        None,
        description="rediss:// only: CA bundle that signed the server's certificate (default: system CAs).",
    )
    tls_cert_file: Path | None = Field(None, description="rediss:// only: client certificate (mutual TLS).")
    tls_key_file: Path | None = Field(None, description="rediss:// only: the client certificate's key.")
    password_file: Path | None = Field(
        None,
        description="File holding the Redis password (mode 0600), read when connecting: the password stays out of "
        "config.yaml and command lines. Instead of a password in url (a user name there is kept).",
    )

    @model_validator(mode="after")
    def _one_password(self) -> RedisBrokerConfig:
        if self.password_file is not None and urlsplit(self.url).password is not None:
            raise ValueError(
                "url holds a password and password_file is set; keep the password in password_file only "
                "(url: redis://host:port/db)"
            )
        return self

    @model_validator(mode="after")
    def _tls_needs_rediss(self) -> RedisBrokerConfig:
        tls = [n for n in ("tls_ca_file", "tls_cert_file", "tls_key_file") if getattr(self, n) is not None]
        if tls and not self.url.startswith("rediss://"):
            raise ValueError(f"{tls[0]} is set but url is not rediss://; use rediss://host:port/db for TLS")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError(
                "tls_cert_file and tls_key_file go together; set both for mutual TLS, or neither"
            )
        return self

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str) -> str:
        if not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                "url must start with redis://, rediss:// (TLS) or unix://; e.g. redis://127.0.0.1:6379/0"
            )
        return v


BrokerConfig = Annotated[ZmqBrokerConfig | RedisBrokerConfig, Field(discriminator="type")]
BROKER_SECTIONS: tuple[type[_BrokerCommon], ...] = get_args(get_args(BrokerConfig)[0])
# The broker a config gets when it names none (and the `type` a `broker:` section without one is given).
DEFAULT_BROKER = ZmqBrokerConfig
# Broker types whose process the launcher starts, for descriptions such as ray.broker's.
EMBEDDED_BROKERS = tuple(c.model_fields["type"].default for c in BROKER_SECTIONS if c.embedded_process)
