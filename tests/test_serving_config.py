"""serving/: the TF Serving config files parse as TF Serving's protos and agree."""

from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format, wrappers_pb2

from tensorflow_serving.config import model_server_config_pb2

SERVING = Path(__file__).resolve().parents[1] / "serving"


def _mirror_messages():
    """BatchingParameters and MonitoringConfig, built from their .proto.

    The tensorflow-serving-api wheel does not ship `session_bundle_config_pb2`
    or `monitoring_config_pb2`, so when they are missing these mirror
    tensorflow_serving/servables/tensorflow/session_bundle_config.proto and
    tensorflow_serving/config/monitoring_config.proto (same package, field
    names, numbers and types), which is all text_format parsing needs.
    """
    F = descriptor_pb2.FieldDescriptorProto
    pool = descriptor_pool.DescriptorPool()
    wrappers = descriptor_pb2.FileDescriptorProto()
    wrappers_pb2.DESCRIPTOR.CopyToProto(wrappers)
    pool.Add(wrappers)
    fd = descriptor_pb2.FileDescriptorProto(
        name="tfface_tests/tf_serving_mirror.proto",
        package="tensorflow.serving",
        syntax="proto3",
        dependency=["google/protobuf/wrappers.proto"],
    )
    batching = fd.message_type.add(name="BatchingParameters")
    for name, number in (
        ("max_batch_size", 1),
        ("batch_timeout_micros", 2),
        ("max_enqueued_batches", 3),
        ("num_batch_threads", 4),
    ):
        batching.field.add(
            name=name, number=number, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL,
            type_name=".google.protobuf.Int64Value",
        )
    batching.field.add(
        name="thread_pool_name", number=5, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL,
        type_name=".google.protobuf.StringValue",
    )
    batching.field.add(name="allowed_batch_sizes", number=6, type=F.TYPE_INT64, label=F.LABEL_REPEATED)
    batching.field.add(name="pad_variable_length_inputs", number=7, type=F.TYPE_BOOL, label=F.LABEL_OPTIONAL)
    prometheus = fd.message_type.add(name="PrometheusConfig")
    prometheus.field.add(name="enable", number=1, type=F.TYPE_BOOL, label=F.LABEL_OPTIONAL)
    prometheus.field.add(name="path", number=2, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    monitoring = fd.message_type.add(name="MonitoringConfig")
    monitoring.field.add(
        name="prometheus_config", number=1, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL,
        type_name=".tensorflow.serving.PrometheusConfig",
    )
    pool.Add(fd)

    def cls(name):
        return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"tensorflow.serving.{name}"))

    return cls("BatchingParameters"), cls("MonitoringConfig")


def _message_classes():
    try:
        from tensorflow_serving.servables.tensorflow.session_bundle_config_pb2 import BatchingParameters
        from tensorflow_serving.config.monitoring_config_pb2 import MonitoringConfig

        return BatchingParameters, MonitoringConfig
    except ImportError:
        return _mirror_messages()


BatchingParameters, MonitoringConfig = _message_classes()


def parse(name, message):
    return text_format.Parse((SERVING / name).read_text(), message)


@pytest.fixture(scope="module")
def compose():
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load((SERVING / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def model_config():
    config = parse("models.config", model_server_config_pb2.ModelServerConfig())
    assert len(config.model_config_list.config) == 1
    return config.model_config_list.config[0]


def flags(compose):
    service = compose["services"]["tf-serving"]
    return dict(arg.lstrip("-").split("=", 1) for arg in service["command"])


def test_models_config(model_config):
    assert model_config.name == "tfface"
    assert model_config.base_path == f"/models/{model_config.name}"
    assert model_config.model_platform == "tensorflow"
    assert model_config.model_version_policy.WhichOneof("policy_choice") == "specific"
    versions = list(model_config.model_version_policy.specific.versions)
    assert versions == [1, 2]
    assert dict(model_config.version_labels) == {"stable": 1, "canary": 2}
    assert set(model_config.version_labels.values()) <= set(versions)


def test_batching_parameters():
    params = parse("batching_parameters.txt", BatchingParameters())
    assert params.max_batch_size.value == 32
    assert 0 < params.batch_timeout_micros.value <= 10_000
    assert params.num_batch_threads.value >= 1
    assert params.max_enqueued_batches.value >= 1
    sizes = list(params.allowed_batch_sizes)
    assert sizes == sorted(set(sizes)) and sizes[-1] == params.max_batch_size.value


def test_monitoring_config():
    config = parse("monitoring.config", MonitoringConfig())
    assert config.prometheus_config.enable
    assert config.prometheus_config.path == "/monitoring/prometheus/metrics"


def test_bad_text_proto_is_rejected():
    with pytest.raises(text_format.ParseError):
        text_format.Parse("max_batch_size: 32", BatchingParameters())  # needs { value: 32 }


def test_compose_runs_tf_serving_on_a_gpu_with_these_files(compose, model_config):
    service = compose["services"]["tf-serving"]
    assert service["image"] == "tensorflow/serving:latest-gpu"
    assert {"8500:8500", "8501:8501"} <= set(service["ports"])
    mounts = dict(v.split(":")[:2] for v in service["volumes"])  # source -> container path
    assert mounts["../saved_models"] == "/models"
    assert model_config.base_path.startswith(mounts["../saved_models"] + "/")
    config_dir = mounts["./"]
    args = flags(compose)
    assert args["port"] == "8500" and args["rest_api_port"] == "8501"
    assert args["enable_batching"] == "true"
    for flag, filename in (
        ("model_config_file", "models.config"),
        ("batching_parameters_file", "batching_parameters.txt"),
        ("monitoring_config_file", "monitoring.config"),
    ):
        assert args[flag] == f"{config_dir}/{filename}"
        assert (SERVING / filename).is_file()
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    health = " ".join(service["healthcheck"]["test"])
    assert f"/v1/models/{model_config.name}" in health and "AVAILABLE" in health


def test_readme_walks_from_export_to_query():
    text = (SERVING / "README.md").read_text()
    for step in ("tfface export", "docker compose up", "docker run", "--gpus all", "tfface query --host localhost:8500"):
        assert step in text, step
