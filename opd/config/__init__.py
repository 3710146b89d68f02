"""The one typed config tree for a run, validated when it is loaded.

Every component reads the same resolved file, so a mistake is caught once, at load time, with a message that
names the field and the fix, instead of surfacing minutes later inside one of four processes.

One module per section (run, task, models, sampling, actor, scorer, learner, weight_sync, broker, scaling,
supervision, ray, metrics, pipeline, images), each with its own cross-field checks; `root` holds the `Config` tree and the
checks that span sections; `loading` reads files and overrides and formats errors; `sources` says, for `opd run`
and `opd prepare`, whether each pretrained model the config names can be found. This package imports nothing else of the
project: rules that need other code (the loss registry) are passed to `load_config(checks=...)`.
"""

from opd.config.actor import ActorConfig
from opd.config.base import Strict
from opd.config.broker import BROKER_SECTIONS, BrokerConfig, RedisBrokerConfig, ZmqBrokerConfig
from opd.config.images import ImagesConfig
from opd.config.learner import CorrectionConfig, DeepSpeedConfig, HybridConfig, LearnerConfig
from opd.config.loading import Check, ConfigError, apply_overrides, describe_fields, dump_config, load_config
from opd.config.metrics import MetricsConfig, TensorBoardConfig, WandbConfig
from opd.config.models import ModelConfig, PretrainedModel, PrunedModel, TinyModel, TinyVlmModel
from opd.config.pipeline import PipelineConfig, ServiceTimeConfig
from opd.config.ray import (
    RayBrokerResources,
    RayConfig,
    RayLearnerResources,
    RayResources,
    RayScorerResources,
)
from opd.config.root import Config
from opd.config.run import RunConfig
from opd.config.sampling import SamplingConfig
from opd.config.scaling import ScalingConfig
from opd.config.scorer import RemoteTeacherConfig, ScorerConfig
from opd.config.supervision import SupervisionConfig
from opd.config.task import (
    AdditionTask,
    CapitalsTask,
    JsonlTask,
    TaskConfig,
    VisualDigitsTask,
    WordProblemsTask,
)
from opd.config.vllm_engine import VLLMEngineConfig
from opd.config.weight_sync import WeightSyncConfig

__all__ = [
    "BROKER_SECTIONS",
    "ActorConfig",
    "AdditionTask",
    "BrokerConfig",
    "CapitalsTask",
    "Check",
    "Config",
    "ConfigError",
    "CorrectionConfig",
    "DeepSpeedConfig",
    "HybridConfig",
    "ImagesConfig",
    "JsonlTask",
    "LearnerConfig",
    "MetricsConfig",
    "ModelConfig",
    "PipelineConfig",
    "PretrainedModel",
    "PrunedModel",
    "RayBrokerResources",
    "RayConfig",
    "RayLearnerResources",
    "RayResources",
    "RayScorerResources",
    "RedisBrokerConfig",
    "RemoteTeacherConfig",
    "RunConfig",
    "SamplingConfig",
    "ScalingConfig",
    "ScorerConfig",
    "ServiceTimeConfig",
    "Strict",
    "SupervisionConfig",
    "TaskConfig",
    "TensorBoardConfig",
    "TinyModel",
    "TinyVlmModel",
    "VLLMEngineConfig",
    "VisualDigitsTask",
    "WandbConfig",
    "WeightSyncConfig",
    "WordProblemsTask",
    "ZmqBrokerConfig",
    "apply_overrides",
    "describe_fields",
    "dump_config",
    "load_config",
]
