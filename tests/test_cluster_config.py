"""cluster.yaml passes the checks `ray up` runs before it touches AWS, and says what mmdp needs.

`ray up` fills the config out with the provider's defaults (``prepare_config``)
and validates it against Ray's ``ray-schema.json`` plus its cross-field rules
(``validate_config``); both run here offline. The AWS-side steps (IAM, subnets,
key pair) need an account and are not exercised.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parent.parent / "cluster.yaml"


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


def test_config_passes_rays_schema_and_rules(prepared):
    # validate_config raised nothing in the fixture; the defaults kept our choices.
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]
    assert set(prepared["available_node_types"]) == {"head", "cpu_worker", "gpu_worker"}


def test_schema_check_is_real(raw):
    """The same validation rejects a broken variant, so the passing test above means something."""
    broken = copy.deepcopy(raw)
    broken["available_node_types"]["gpu_worker"]["resources"]["GPU"] = "one"
    with pytest.raises(Exception, match="not of type 'integer'"):
        validate_config(prepare_config(broken))


def test_gpu_workers_scale_from_zero_to_a_bound(prepared):
    types = prepared["available_node_types"]
    gpu = types["gpu_worker"]
    assert gpu["resources"]["GPU"] >= 1
    assert gpu["min_workers"] == 0
    assert 1 <= gpu["max_workers"] <= prepared["max_workers"]
    assert types["cpu_worker"]["min_workers"] == 0
    assert "GPU" not in types["cpu_worker"]["resources"]
    assert 0 < prepared["idle_timeout_minutes"] <= 30
    # Terminated when idle, not stopped (a stopped node keeps its disk, billed).
    assert prepared["provider"]["cache_stopped_nodes"] is False


def test_workers_get_object_store_access_from_an_instance_profile(prepared):
    for name in ("cpu_worker", "gpu_worker"):
        profile = prepared["available_node_types"][name]["node_config"]["IamInstanceProfile"]
        assert profile.get("Name") or profile.get("Arn"), name
    # pipeline.storage's S3 client takes the region from the environment: every container gets the cluster's.
    assert f"--env AWS_DEFAULT_REGION={prepared['provider']['region']}" in prepared["docker"]["run_options"]


def test_setup_installs_mmdp_with_the_pinned_constraints(prepared):
    assert prepared["file_mounts"] == {"~/mmdp": "."}
    commands = " ".join(prepared["setup_commands"])
    assert "-c ~/mmdp/constraints.txt" in commands and "~/mmdp" in commands
    pinned_ray = re.search(r"^ray==(\S+)$", (CLUSTER_YAML.parent / "constraints.txt").read_text(), re.M).group(1)
    assert prepared["docker"]["image"].startswith(f"rayproject/ray:{pinned_ray}-py311")


def test_no_credentials_in_the_file():
    text = CLUSTER_YAML.read_text()
    for pattern in (r"aws_secret_access_key", r"aws_access_key_id", r"aws_session_token",
                    r"AKIA[0-9A-Z]{16}", r"ASIA[0-9A-Z]{16}", r"secret", r"password"):
        assert not re.search(pattern, text, re.I), pattern
