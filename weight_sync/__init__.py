"""Weight broadcast from learner to actors over torch.distributed (no model knowledge here)."""

from weight_sync.auth import Signer, Unauthenticated
from weight_sync.broadcast import SyncStats, WeightBroadcaster, WeightReceiver, plan_buckets
from weight_sync.elastic import ElasticBroadcaster, ElasticReceiver
from weight_sync.group import make_group, make_store, resolve_backend

__all__ = [
    "ElasticBroadcaster",
    "ElasticReceiver",
    "Signer",
    "SyncStats",
    "Unauthenticated",
    "WeightBroadcaster",
    "WeightReceiver",
    "make_group",
    "make_store",
    "plan_buckets",
    "resolve_backend",
]
