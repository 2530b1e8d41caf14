"""Every config in every group composes, and resolves where the group's values do not depend on the model."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from jactus.utils.run import CONF_DIR

CONF = Path(CONF_DIR)

GROUPS = ["model", "data", "method", "budget", "allocator", "calib", "optim", "trainer", "logger", "callbacks"]


def resolved(cfg) -> dict:
    """Every interpolation of the run's own config resolves (the `hydra` node is Hydra's business)."""
    run = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    return OmegaConf.to_container(run, resolve=True)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_config_composes(group, option, compose_cfg):
    overrides = [f"{group}={option}"]
    if group == "model":
        vision = OmegaConf.load(CONF / "model" / f"{option}.yaml").family == "vision"
        overrides.append("data=synthetic_vision" if vision else "data=synthetic_qa")
    if group == "data":
        vision = "_vision" in OmegaConf.load(CONF / "data" / f"{option}.yaml").get("defaults", [])
        overrides.append("model=vit_tiny_test" if vision else "model=llama_tiny_test")
    cfg = compose_cfg(overrides)
    container = resolved(cfg)
    assert container["model"]["name"]
    assert container["data"]["name"]


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes(experiment, compose_cfg):
    cfg = compose_cfg([f"experiment={experiment}"])
    assert cfg.experiment_name != "adhoc", "experiment files must name themselves (experiment_name)"
    resolved(cfg)


def test_unknown_group_option_lists_valid_choices(compose_cfg):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="Available options"):
        compose_cfg(["model=no_such_model"])


def test_ablation_configs_inherit_jactus(compose_cfg):
    cfg = compose_cfg(["method=jactus_rho0"])
    assert cfg.method._target_ == "jactus.methods.jactus.Jactus"
    assert cfg.method.rho == 0.0 and cfg.method.weight_basis == "whitened"


@pytest.mark.parametrize("how", ["--config-dir", "hydra.searchpath"])
def test_users_add_their_own_configs(how, tmp_path):
    """README "Your own configs": an experiment of the user's own, found through --config-dir or hydra.searchpath."""
    import subprocess
    import sys

    (tmp_path / "my_conf" / "experiment").mkdir(parents=True)
    (tmp_path / "my_conf" / "experiment" / "my_table.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /method: lora\nexperiment_name: my_table\nseed: 7\n")
    where = ["--config-dir", "my_conf"] if how == "--config-dir" else [f"hydra.searchpath=[file://{tmp_path}/my_conf]"]
    result = subprocess.run([sys.executable, "-m", "jactus.train", *where, "experiment=my_table", "--cfg", "job"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    job = OmegaConf.create(result.stdout)
    assert job.experiment_name == "my_table" and job.seed == 7 and job.method._target_.endswith("LoRA")


def test_calib_loss_sequence_is_for_language_models(compose_cfg):
    from jactus.utils.run import build_run

    cfg = compose_cfg(["model=vit_tiny_test", "data=synthetic_vision", "calib.loss=sequence"])
    with pytest.raises(ValueError, match=r"calib.loss='sequence' is for causal-LM QA"):
        build_run(cfg)
    cfg = compose_cfg(["model=llama_tiny_test", "data=synthetic_qa", "calib.loss=sequence"])
    assert build_run(cfg).module.calib_loss == "sequence"


def test_jactus_rho_is_set_per_experiment_and_overridable(compose_cfg):
    from omegaconf import OmegaConf

    def rho(overrides):
        return OmegaConf.to_container(compose_cfg(overrides).method, resolve=True)["rho"]

    assert rho(["variant=jactus_0.8"]) == 0.25
    assert rho(["experiment=offline_llama", "variant=jactus_0.8"]) == 0.0  # chosen on validation (issue 19)
    assert rho(["experiment=offline_llama", "method=jactus_palette"]) == 0.0
    assert rho(["experiment=offline_llama", "variant=jactus_0.8", "method.rho=0.1"]) == 0.1
    assert compose_cfg(["experiment=offline_llama"]).calib.num_samples == 512
    # jactus-compress: no fine-tuning follows, so no rank for task directions unless asked
    compress = OmegaConf.to_container(compose_cfg([], config_name="compress").method, resolve=True)
    assert compress["rho"] == 0.0
    assert OmegaConf.to_container(compose_cfg(["jactus_rho=0.25"], config_name="compress").method,
                                  resolve=True)["rho"] == 0.25


def test_shared_bases_are_chosen_per_experiment(compose_cfg):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    def share(overrides, config_name="train"):
        return OmegaConf.to_container(compose_cfg(overrides, config_name=config_name).method, resolve=True)[
            "share_bases"]

    assert share(["variant=jactus_0.8"]) is False  # the paper's per-layer bases
    assert share(["variant=jactus_0.8_shared"]) == ["gate_proj", "up_proj"]
    assert share(["variant=jactus_0.8", "jactus_share_bases=[gate_proj,up_proj]"]) == ["gate_proj", "up_proj"]
    method = instantiate(compose_cfg(["variant=jactus_0.8_shared"]).method, _convert_="all")
    assert method.share_bases == ["gate_proj", "up_proj"]
    # chosen on validation for the SmolLM2 experiment (issue 27) and for jactus-compress; pinned off where asked
    assert share(["experiment=offline_llama", "variant=jactus_0.8"]) == ["gate_proj", "up_proj"]
    assert share(["experiment=offline_llama", "variant=jactus_0.8", "jactus_share_bases=false"]) is False
    assert share([], config_name="compress") == ["gate_proj", "up_proj"]


def test_pool_variant_is_the_shared_row_with_more_calibration(compose_cfg):
    from omegaconf import OmegaConf

    cfg = compose_cfg(["experiment=offline_llama", "variant=jactus_0.8_pool"])
    assert (cfg.method_label, cfg.budget.ratio) == ("jactus+pool", 0.8)
    module = OmegaConf.to_container(cfg.data.module, resolve=True)
    assert module["calib_num_samples"] == cfg.calib.num_samples == 2048  # not the experiment's 512
    assert module["calib_source"] == "pool"
    method = OmegaConf.to_container(cfg.method, resolve=True)
    assert method["share_bases"] == ["gate_proj", "up_proj"] and method["rho"] == 0.0
