"""Transport between components: a small interface (base.py) and its implementations."""

from broker.base import (
    Broker,
    BrokerUnavailable,
    Capabilities,
    Message,
    publish_with_backpressure,
    stream_name,
)

# TEMP stub (dropped at merge): the broker helper's registry replaces this.
_CAPABILITIES = {
    "zmq": Capabilities(
        needs_server=False,
        embedded_process=True,
        redelivers=False,
        keeps_dead_letters=False,
        multi_host=False,
    ),
    "redis": Capabilities(
        needs_server=True, embedded_process=False, redelivers=True, keeps_dead_letters=True, multi_host=True
    ),
}


def capabilities(section) -> Capabilities:
    """TEMP stub: the capabilities of the broker type named in `broker:`."""
    return _CAPABILITIES[section.type]


def serve(section) -> None:
    """TEMP stub: run the embedded broker of `broker:` in the foreground."""
    if not capabilities(section).embedded_process:
        raise ValueError(f"broker.type: {section.type} has no embedded broker process to start")
    from broker.zmq import serve as serve_zmq

    serve_zmq(
        f"tcp://{section.host}:{section.port}",
        section.max_depth,
        section.control_maxlen,
        int(section.max_message_mb * (1 << 20)),
    )


def connect(cfg) -> Broker:
    """A client for the broker named in `broker:` of the config."""
    if cfg.type == "zmq":
        from broker.zmq import ZmqBroker

        return ZmqBroker(
            f"tcp://{cfg.host}:{cfg.port}", cfg.request_timeout_s, int(cfg.max_message_mb * (1 << 20))
        )
    if cfg.type == "redis":
        from broker.redis import RedisBroker

        return RedisBroker(
            cfg.url,
            max_depth=cfg.max_depth,
            log_maxlen=cfg.control_maxlen,
            claim_idle_s=cfg.claim_idle_s,
            max_deliveries=cfg.max_deliveries,
            request_timeout_s=cfg.request_timeout_s,
            max_message_bytes=int(cfg.max_message_mb * (1 << 20)),
            tls={
                k: str(v)
                for k, v in (
                    ("ssl_ca_certs", cfg.tls_ca_file),
                    ("ssl_certfile", cfg.tls_cert_file),
                    ("ssl_keyfile", cfg.tls_key_file),
                )
                if v is not None
            },
        )
    raise NotImplementedError(f"broker.type {cfg.type!r}")


__all__ = [
    "Broker",
    "BrokerUnavailable",
    "Capabilities",
    "Message",
    "capabilities",
    "connect",
    "serve",
    "publish_with_backpressure",
    "stream_name",
]
