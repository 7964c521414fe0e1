"""The NeMo-Aligner PPO tutorial's commands, pasted verbatim (paths aside), compose against our entry
scripts, and NeMo's spellings (model.data.data_prefix, model.ppo.combine_rm_and_critic_server, ...)
land on the keys our trainers read.

Each command runs as a real `bash` script through our entry script with `--cfg job` (Hydra composes
and prints the config without running the job); the printed config then goes through the same
`prepare_config` every entry runs first (schema check + NeMo spellings resolved).
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from aligner.training import nemo_compat
from aligner.training.config_check import ConfigError, check_config
from aligner.training.entry import CONF_DIR, check_logger_packages, prepare_config
from tests.launch import REPO, child_env

# ---- the tutorial's commands, verbatim except that its literal paths became variables -------------

RM_TERMINAL = r"""
python -u ${GPFS}/examples/nlp/gpt/train_reward_model.py \
   trainer.num_nodes=1 \
   trainer.devices=8 \
   ++model.micro_batch_size=1 \
   ++model.global_batch_size=512 \
   ++model.data.data_impl=jsonl \
   pretrained_checkpoint.restore_from_path=${SFT_NEMO_FILE} \
   "model.data.data_prefix={train: [${TRAIN_DATA_PATH}], validation: [${VALID_DATA_PATH}], test: [${VALID_DATA_PATH}]}" \
   exp_manager.create_wandb_logger=False \
   exp_manager.wandb_logger_kwargs.project=rm_training \
   exp_manager.wandb_logger_kwargs.name=rm_training \
   exp_manager.explicit_log_dir=${RESULTS_DIR} --cfg job
"""

# NAME is never set in the tutorial's script, so wandb_logger_kwargs.name= arrives empty.
RM_SLURM = r"""
read -r -d '' cmd <<EOF
echo "*******STARTING********" \
&& echo "---------------" \
&& echo "Starting training" \
&& cd ${GPFS} \
&& export PYTHONPATH="${GPFS}:${PYTHONPATH}" \
&& export HYDRA_FULL_ERROR=1 \
&& python -u ${GPFS}/examples/nlp/gpt/train_reward_model.py \
    trainer.num_nodes=${SLURM_JOB_NUM_NODES} \
    trainer.devices=8 \
    pretrained_checkpoint.restore_from_path='${PRETRAINED_CHECKPOINT_NEMO_FILE}' \
    "++model.data.data_prefix={train: [${TRAIN_DATA_PATH}], validation: [${VALID_DATA_PATH}], test: [${VALID_DATA_PATH}]}" \
    ++model.micro_batch_size=1 \
    ++model.global_batch_size=512 \
    ++model.data.data_impl=jsonl \
    exp_manager.explicit_log_dir=${RESULTS_DIR} \
    exp_manager.create_wandb_logger=True \
    exp_manager.wandb_logger_kwargs.name=${NAME} \
    trainer.rm.save_interval=500 \
    trainer.rm.val_check_interval=100 \
    trainer.rm.limit_val_batches=100000 \
    exp_manager.wandb_logger_kwargs.project=${PROJECT}
EOF
bash -c "${cmd} --cfg job"
"""

CRITIC_TERMINAL = r"""
export PYTHONPATH="${GPFS}:${PYTHONPATH}" \
&& export HYDRA_FULL_ERROR=1 \
&& python -u ${GPFS}/examples/nlp/gpt/serve_ppo_critic.py \
    trainer.devices=8 \
    trainer.num_nodes=1 \
    ++model.tensor_model_parallel_size=1 \
    ++model.pipeline_model_parallel_size=1 \
    exp_manager.create_wandb_logger=False \
    exp_manager.wandb_logger_kwargs.name=critic_training \
    exp_manager.wandb_logger_kwargs.project=nemo_aligner_ppo \
    exp_manager.explicit_log_dir=${RESULTS_DIR} \
    trainer.ppo.inference_micro_batch_size=4 \
    ++pretrained_checkpoint.restore_from_path=${CHECKPOINT_NEMO_FILE} \
    ++model.megatron_amp_O2=True \
    ++model.activations_checkpoint_granularity=null \
    ++trainer.ppo.combine_rm_and_critic_server=True \
    ++model.offload_adam_states=True \
    ++model.mcore_gpt=True --cfg job
"""

ACTOR_TERMINAL = r"""
export PYTHONPATH="${GPFS}:${PYTHONPATH}" \
&& export HYDRA_FULL_ERROR=1 \
&& python -u ${GPFS}/examples/nlp/gpt/train_gpt_ppo_actor.py \
    "++model.data.data_prefix={train: [${TRAIN_DATA_PATH}], validation: [${VALID_DATA_PATH}], test: [${VALID_DATA_PATH}]}" \
    ++model.data.data_impl=jsonl \
    pretrained_checkpoint.restore_from_path=${PRETRAINED_ACTOR_NEMO_FILE} \
    trainer.num_nodes=1 \
    trainer.devices=8 \
    ++model.pipeline_model_parallel_size=1 \
    ++model.tensor_model_parallel_size=1 \
    ++model.ppo.combine_rm_and_critic_server=True \
    ++model.ppo.offload_adam_states=True \
    ++model.megatron_amp_O2=True \
    ++trainer.ppo.normalize_advantages=True \
    ++model.mcore_gpt=True \
    exp_manager.create_wandb_logger=False \
    exp_manager.wandb_logger_kwargs.name=ppo_actor_training \
    exp_manager.wandb_logger_kwargs.project=nemo_aligner_ppo \
    exp_manager.explicit_log_dir=${RESULTS_DIR} \
    ++model.ppo.entropy_bonus=0.0 \
    remote_critic_rm.pad_to_length=2048 --cfg job
"""

# The het-job script's non-path settings, as it sets them.
HETJOB_SETTINGS = r"""
NAME="2p_ppo"
PROJECT=ppo_run
CRITIC_PORT=5567
CRITIC_NAME="${NAME}_critic"
ACTOR_NAME="${NAME}_actor"
"""

CRITIC_HETJOB = HETJOB_SETTINGS + r"""
read -r -d '' cmd_critic_inference <<EOF
cd ${GPFS} \
&& export PYTHONPATH="${GPFS}:${PYTHONPATH}" \
&& export HYDRA_FULL_ERROR=1 \
&& python -u ${GPFS}/examples/nlp/gpt/serve_ppo_critic.py \
    trainer.ppo.inference_micro_batch_size=4 \
    trainer.devices=8 \
    trainer.num_nodes=${SLURM_JOB_NUM_NODES_HET_GROUP_0} \
    exp_manager.explicit_log_dir=${CRITIC_LOG_DIR} \
    exp_manager.create_wandb_logger=True \
    exp_manager.wandb_logger_kwargs.name=${CRITIC_NAME} \
    exp_manager.wandb_logger_kwargs.project=${PROJECT} \
    trainer.ppo.port=${CRITIC_PORT} \
    ++model.offload_adam_states=True \
    ++model.micro_batch_size=1 \
    ++model.global_batch_size=64 \
    pretrained_checkpoint.restore_from_path=${RM_NEMO_FILE}
EOF
bash -c "${cmd_critic_inference} --cfg job"
"""

ACTOR_HETJOB = HETJOB_SETTINGS + r"""
read -r -d '' cmd_ppo <<EOF
cd ${GPFS} \
&& export PYTHONPATH="${GPFS}:${PYTHONPATH}" \
&& export HYDRA_FULL_ERROR=1 \
&& python -u ${GPFS}/examples/nlp/gpt/train_gpt_ppo_actor.py \
    trainer.devices=8 \
    trainer.num_nodes=${SLURM_JOB_NUM_NODES_HET_GROUP_1} \
    trainer.ppo.max_steps=15 \
    ++model.data.data_impl=jsonl \
    "++model.data.data_prefix={train: [${TRAIN_DATA_PATH}], validation: [${VALID_DATA_PATH}], test: [${VALID_DATA_PATH}]}" \
    pretrained_checkpoint.restore_from_path=${ACTOR_NEMO_FILE} \
    exp_manager.explicit_log_dir=${ACTOR_LOG_DIR} \
    exp_manager.create_wandb_logger=True \
    exp_manager.wandb_logger_kwargs.name=${ACTOR_NAME} \
    exp_manager.wandb_logger_kwargs.project=${PROJECT} \
    ++model.micro_batch_size=1 \
    ++model.global_batch_size=64 \
    ++model.activations_checkpoint_granularity=selective \
    ++model.activations_checkpoint_method=uniform \
    ++model.optim.lr=9e-7 \
    trainer.ppo.val_check_interval=3 \
    ++model.optim.sched.min_lr=9e-8 \
    ++model.ppo.entropy_bonus=0.0 \
    ++model.ppo.ratio_eps=0.2 \
    ++model.ppo.num_rollout_samples=512 \
    ++model.ppo.rollout_micro_batch_size=8 \
    ++model.ppo.length_params.max_length=1024 \
    trainer.ppo.initial_policy_kl_penalty=0.02 \
    remote_critic_rm.critic.ip=${host_critic} \
    remote_critic_rm.critic.port=${CRITIC_PORT}
EOF
bash -c "${cmd_ppo} --cfg job"
"""


@pytest.fixture
def paths(tmp_path) -> dict[str, str]:
    """The tutorial's path variables (and the SLURM ones a cluster would set), under tmp_path."""
    p = {
        "TRAIN_DATA_PATH": tmp_path / "data" / "train_comparisons.jsonl",
        "VALID_DATA_PATH": tmp_path / "data" / "test_comparisons.jsonl",
        "SFT_NEMO_FILE": tmp_path / "megatron_gpt_sft.nemo",
        "PRETRAINED_CHECKPOINT_NEMO_FILE": tmp_path / "megatron_gpt_sft.nemo",
        "CHECKPOINT_NEMO_FILE": tmp_path / "trained_rm.nemo",
        "RM_NEMO_FILE": tmp_path / "trained_rm.nemo",
        "PRETRAINED_ACTOR_NEMO_FILE": tmp_path / "sft_checkpoint.nemo",
        "ACTOR_NEMO_FILE": tmp_path / "sft_model.nemo",
        "RESULTS_DIR": tmp_path / "results",
        "CRITIC_LOG_DIR": tmp_path / "results" / "critic_results",
        "ACTOR_LOG_DIR": tmp_path / "results" / "actor_results",
    }
    return {k: str(v) for k, v in p.items()}


def compose_with_tutorial_command(script: str, variables: dict[str, str], tmp_path: Path):
    """Run the command with bash; return (composed config from `--cfg job`, the config after
    prepare_config, the schema it was checked against)."""
    env = child_env(GPFS=str(REPO), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                    SLURM_JOB_NUM_NODES="4", SLURM_JOB_NUM_NODES_HET_GROUP_0="1",
                    SLURM_JOB_NUM_NODES_HET_GROUP_1="1", PROJECT="rm_project", host_critic="node-017",
                    **variables)
    env.pop("NAME", None)
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, cwd=str(tmp_path),
                          timeout=120)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    lines = proc.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("name: "))  # after the script's echoes
    composed = OmegaConf.create("\n".join(lines[start:]))
    config_name = {"reward_model": "training_rm", "gpt_ppo_critic": "gpt_ppo_critic",
                   "gpt_ppo_actor": "gpt_ppo_actor"}[composed.name]
    schema = CONF_DIR / f"{config_name}.yaml"
    resolved = composed.copy()
    OmegaConf.set_struct(resolved, True)  # as Hydra hands it to the entry
    prepare_config(resolved, schema)
    return composed, resolved, schema


def assert_keys(cfg, expected: dict) -> None:
    for key, value in expected.items():
        got = OmegaConf.select(cfg, key, default="<missing>")
        got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
        assert got == value, f"{key}: expected {value!r}, got {got!r}"


def _prefix(p):
    return {"train": [p["TRAIN_DATA_PATH"]], "validation": [p["VALID_DATA_PATH"]], "test": [p["VALID_DATA_PATH"]]}


def _files(p):
    return {"model.data.train_ds.file_path": p["TRAIN_DATA_PATH"],
            "model.data.validation_ds.file_path": p["VALID_DATA_PATH"]}


def test_reward_model_terminal_command(paths, tmp_path):
    composed, resolved, _ = compose_with_tutorial_command(RM_TERMINAL, paths, tmp_path)
    assert composed.name == "reward_model"
    assert_keys(composed, {
        "trainer.num_nodes": 1, "trainer.devices": 8, "model.micro_batch_size": 1, "model.global_batch_size": 512,
        "model.data.data_impl": "jsonl", "pretrained_checkpoint.restore_from_path": paths["SFT_NEMO_FILE"],
        "model.data.data_prefix": _prefix(paths), "exp_manager.create_wandb_logger": False,
        "exp_manager.wandb_logger_kwargs.project": "rm_training", "exp_manager.wandb_logger_kwargs.name": "rm_training",
        "exp_manager.explicit_log_dir": paths["RESULTS_DIR"],
    })
    assert_keys(resolved, _files(paths))


def test_reward_model_slurm_command(paths, tmp_path):
    composed, resolved, _ = compose_with_tutorial_command(RM_SLURM, paths, tmp_path)
    assert composed.name == "reward_model"
    assert_keys(composed, {
        "trainer.num_nodes": 4, "trainer.devices": 8,
        "pretrained_checkpoint.restore_from_path": paths["PRETRAINED_CHECKPOINT_NEMO_FILE"],
        "model.data.data_prefix": _prefix(paths), "model.micro_batch_size": 1, "model.global_batch_size": 512,
        "model.data.data_impl": "jsonl", "exp_manager.explicit_log_dir": paths["RESULTS_DIR"],
        "exp_manager.create_wandb_logger": True, "exp_manager.wandb_logger_kwargs.name": "",
        "exp_manager.wandb_logger_kwargs.project": "rm_project", "trainer.rm.save_interval": 500,
        "trainer.rm.val_check_interval": 100, "trainer.rm.limit_val_batches": 100000,
    })
    assert_keys(resolved, _files(paths))


def test_critic_terminal_command(paths, tmp_path):
    composed, resolved, _ = compose_with_tutorial_command(CRITIC_TERMINAL, paths, tmp_path)
    assert composed.name == "gpt_ppo_critic"
    assert_keys(resolved, {
        "trainer.devices": 8, "trainer.num_nodes": 1, "model.tensor_model_parallel_size": 1,
        "model.pipeline_model_parallel_size": 1, "exp_manager.create_wandb_logger": False,
        "exp_manager.wandb_logger_kwargs.name": "critic_training",
        "exp_manager.wandb_logger_kwargs.project": "nemo_aligner_ppo", "exp_manager.explicit_log_dir": paths["RESULTS_DIR"],
        "trainer.ppo.inference_micro_batch_size": 4,
        "pretrained_checkpoint.restore_from_path": paths["CHECKPOINT_NEMO_FILE"], "model.megatron_amp_O2": True,
        "model.activations_checkpoint_granularity": None, "trainer.ppo.combine_rm_and_critic_server": True,
        "model.offload_adam_states": True, "model.mcore_gpt": True,
    })


def test_critic_hetjob_command(paths, tmp_path):
    composed, resolved, _ = compose_with_tutorial_command(CRITIC_HETJOB, paths, tmp_path)
    assert composed.name == "gpt_ppo_critic"
    assert_keys(resolved, {
        "trainer.ppo.inference_micro_batch_size": 4, "trainer.devices": 8, "trainer.num_nodes": 1,
        "exp_manager.explicit_log_dir": paths["CRITIC_LOG_DIR"], "exp_manager.create_wandb_logger": True,
        "exp_manager.wandb_logger_kwargs.name": "2p_ppo_critic", "exp_manager.wandb_logger_kwargs.project": "ppo_run",
        "trainer.ppo.port": 5567, "model.offload_adam_states": True, "model.micro_batch_size": 1,
        "model.global_batch_size": 64, "pretrained_checkpoint.restore_from_path": paths["RM_NEMO_FILE"],
    })


def test_actor_terminal_command(paths, tmp_path):
    composed, resolved, _ = compose_with_tutorial_command(ACTOR_TERMINAL, paths, tmp_path)
    assert composed.name == "gpt_ppo_actor"
    assert_keys(composed, {
        "model.data.data_prefix": _prefix(paths), "model.data.data_impl": "jsonl",
        "pretrained_checkpoint.restore_from_path": paths["PRETRAINED_ACTOR_NEMO_FILE"],
        "trainer.num_nodes": 1, "trainer.devices": 8, "model.pipeline_model_parallel_size": 1,
        "model.tensor_model_parallel_size": 1, "model.ppo.combine_rm_and_critic_server": True,
        "model.ppo.offload_adam_states": True, "model.megatron_amp_O2": True,
        "trainer.ppo.normalize_advantages": True, "model.mcore_gpt": True, "exp_manager.create_wandb_logger": False,
        "exp_manager.wandb_logger_kwargs.name": "ppo_actor_training",
        "exp_manager.wandb_logger_kwargs.project": "nemo_aligner_ppo",
        "exp_manager.explicit_log_dir": paths["RESULTS_DIR"], "model.ppo.entropy_bonus": 0.0,
        "remote_critic_rm.pad_to_length": 2048,
    })
    assert_keys(resolved, {**_files(paths), "remote_critic_rm.combine_rm_and_critic_server": True})


def test_actor_hetjob_command(paths, tmp_path):
    composed, resolved, _ = compose_with_tutorial_command(ACTOR_HETJOB, paths, tmp_path)
    assert composed.name == "gpt_ppo_actor"
    assert_keys(resolved, {
        **_files(paths), "trainer.devices": 8, "trainer.num_nodes": 1, "trainer.ppo.max_steps": 15,
        "model.data.data_impl": "jsonl", "pretrained_checkpoint.restore_from_path": paths["ACTOR_NEMO_FILE"],
        "exp_manager.explicit_log_dir": paths["ACTOR_LOG_DIR"], "exp_manager.create_wandb_logger": True,
        "exp_manager.wandb_logger_kwargs.name": "2p_ppo_actor", "exp_manager.wandb_logger_kwargs.project": "ppo_run",
        "model.micro_batch_size": 1, "model.global_batch_size": 64,
        "model.activations_checkpoint_granularity": "selective", "model.activations_checkpoint_method": "uniform",
        "model.optim.lr": 9e-7, "trainer.ppo.val_check_interval": 3, "model.optim.sched.min_lr": 9e-8,
        "model.ppo.entropy_bonus": 0.0, "model.ppo.ratio_eps": 0.2, "model.ppo.num_rollout_samples": 512,
        "model.ppo.rollout_micro_batch_size": 8, "model.ppo.length_params.max_length": 1024,
        "trainer.ppo.initial_policy_kl_penalty": 0.02, "remote_critic_rm.critic.ip": "node-017",
        "remote_critic_rm.critic.port": 5567,
    })


# ---- the mapping itself, on configs composed in-process from our YAMLs ------------------------------

def compose(config_name: str, overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = hydra_compose(config_name, overrides=overrides)
    return cfg, CONF_DIR / f"{config_name}.yaml"


def prepared(config_name: str, overrides: list[str]):
    cfg, schema = compose(config_name, overrides)
    prepare_config(cfg, schema)
    return cfg


@pytest.mark.parametrize("config_name", ["training_rm", "gpt_ppo_actor", "gpt_dpo"])
def test_data_prefix_sets_train_and_validation_files(config_name):
    cfg = prepared(config_name, ["model.data.data_prefix={train: [/d/t.jsonl], validation: [/d/v.jsonl], test: [/d/x.jsonl]}"])
    assert cfg.model.data.train_ds.file_path == "/d/t.jsonl"
    assert cfg.model.data.validation_ds.file_path == "/d/v.jsonl"  # test: accepted, read by no trainer


def test_data_prefix_accepts_bare_strings_per_split_and_partial_dicts():
    cfg = prepared("training_rm", ["model.data.data_prefix={train: /d/t.jsonl}"])
    assert cfg.model.data.train_ds.file_path == "/d/t.jsonl"
    assert cfg.model.data.validation_ds.file_path == "data/movie_reviews/comparisons_val.jsonl"  # untouched


def test_data_prefix_and_file_path_naming_the_same_file_agree():
    cfg = prepared("training_rm", ["model.data.data_prefix={train: [/d/t.jsonl]}",
                                   "model.data.train_ds.file_path=/d/../d/t.jsonl"])
    assert cfg.model.data.train_ds.file_path == "/d/t.jsonl"


@pytest.mark.parametrize("overrides, message", [
    (["model.data.data_prefix={train: [/d/t.jsonl]}", "model.data.train_ds.file_path=/d/other.jsonl"],
     "model.data.data_prefix.train (/d/t.jsonl) and model.data.train_ds.file_path (/d/other.jsonl) name different files"),
    (["model.data.data_prefix={validation: [/d/v.jsonl]}", "model.data.validation_ds.file_path=/d/w.jsonl"],
     "model.data.data_prefix.validation (/d/v.jsonl) and model.data.validation_ds.file_path (/d/w.jsonl)"),
    (["model.data.data_prefix={train: [/d/a.jsonl, /d/b.jsonl]}"],
     "model.data.data_prefix.train lists 2 entries ['/d/a.jsonl', '/d/b.jsonl']: only one file per split is supported"),
    (["model.data.data_prefix={train: [0.5, /d/a.jsonl]}"], "only one file per split is supported"),
    (["model.data.data_prefix={train: [3]}"], "model.data.data_prefix.train: expected a file path, got 3"),
    (["model.data.data_prefix=/d/all.jsonl"], "is a single path (in NeMo, one dataset split into train/validation/test"),
    (["model.data.data_prefix=[1.0, /d/a.jsonl]"], "model.data.data_prefix is a list (NeMo's blended"),
    (["model.data.data_prefix={training: [/d/a.jsonl]}"], "model.data.data_prefix: unknown split(s) ['training']"),
    (["model.data.data_impl=mmap"], "model.data.data_impl=mmap: only jsonl files are read"),
    (["model.mcore_gpt=False"], "model.mcore_gpt=False asks for NeMo's legacy GPT model"),
    (["model.megatron_amp_O2=False", "trainer.precision=bf16"], "model.megatron_amp_O2=False (fp32 weights under autocast)"),
    (["model.activations_checkpoint_granularity=some"], "model.activations_checkpoint_granularity=some: expected one of"),
    (["model.activations_checkpoint_method=even"], "model.activations_checkpoint_method=even: expected one of"),
])
def test_nemo_spellings_with_no_meaning_here_fail_naming_the_key(overrides, message):
    cfg, schema = compose("training_rm", overrides)
    with pytest.raises(ConfigError) as info:
        prepare_config(cfg, schema)
    assert message in str(info.value)


def test_flags_without_effect_in_fp32_are_accepted():
    cfg = prepared("gpt_ppo_critic", ["model.megatron_amp_O2=False", "model.activations_checkpoint_granularity=full",
                                      "model.activations_checkpoint_method=block"])
    assert cfg.model.megatron_amp_O2 is False


def test_actor_combine_rm_and_critic_server_alias():
    cfg = prepared("gpt_ppo_actor", ["++model.ppo.combine_rm_and_critic_server=False"])
    assert cfg.remote_critic_rm.combine_rm_and_critic_server is False
    cfg = prepared("gpt_ppo_actor", ["model.ppo.combine_rm_and_critic_server=True",
                                     "remote_critic_rm.combine_rm_and_critic_server=True"])
    assert cfg.remote_critic_rm.combine_rm_and_critic_server is True
    cfg, schema = compose("gpt_ppo_actor", ["model.ppo.combine_rm_and_critic_server=True",
                                            "remote_critic_rm.combine_rm_and_critic_server=False"])
    with pytest.raises(ConfigError, match="model.ppo.combine_rm_and_critic_server=True and "
                                          "remote_critic_rm.combine_rm_and_critic_server=False disagree"):
        prepare_config(cfg, schema)


def test_unknown_keys_are_still_refused_but_wandb_kwargs_stay_open():
    cfg, schema = compose("training_rm", ["+model.data.data_prefixes={train: [/d/t.jsonl]}", "++model.mcore_gpu=True"])
    with pytest.raises(ConfigError) as info:
        prepare_config(cfg, schema)
    assert "model.data.data_prefixes: unknown key" in str(info.value)
    assert "model.mcore_gpu: unknown key" in str(info.value)
    cfg = prepared("training_rm", ["+exp_manager.wandb_logger_kwargs.entity=team", "+exp_manager.wandb_logger_kwargs.tags=[a]"])
    assert cfg.exp_manager.wandb_logger_kwargs.entity == "team"


def test_data_prefix_files_alone():
    assert nemo_compat.data_prefix_files(None) == {}
    assert nemo_compat.data_prefix_files({"train": ["a"], "validation": [], "test": ["c"]}) == {"train": "a"}


# ---- W&B: name/project reach Lightning's WandbLogger --------------------------------------------------

def test_wandb_name_and_project_reach_the_lightning_logger(tmp_path, monkeypatch):
    from pytorch_lightning import loggers as pl_loggers

    from aligner.training.metrics_log import MetricsLogger

    made = []

    class FakeWandbLogger(pl_loggers.CSVLogger):  # wandb itself is an optional extra
        def __init__(self, **kwargs):
            made.append(kwargs)
            super().__init__(save_dir=str(tmp_path), name="fake")

    monkeypatch.setattr(pl_loggers, "WandbLogger", FakeWandbLogger)
    cfg = prepared("training_rm", ["exp_manager.create_wandb_logger=True", "exp_manager.wandb_logger_kwargs.name=rm_training",
                                   "exp_manager.wandb_logger_kwargs.project=nemo_aligner", "+exp_manager.wandb_logger_kwargs.group=g"])
    em = cfg.exp_manager
    MetricsLogger(tmp_path, "rm", csv=False, tensorboard=False, wandb=bool(em.create_wandb_logger),
                  wandb_kwargs=OmegaConf.to_container(em.wandb_logger_kwargs)).close()
    assert made == [{"name": "rm_training", "project": "nemo_aligner", "group": "g", "offline": True,
                     "save_dir": str(tmp_path)}]
    made.clear()
    MetricsLogger(tmp_path / "b", "rm", csv=False, tensorboard=False, wandb=True,
                  wandb_kwargs={"name": "", "project": None}).close()  # name=${NAME} with NAME unset
    assert made == [{"offline": True, "save_dir": str(tmp_path / "b")}]


def test_wandb_logger_without_the_package_fails_at_start(monkeypatch):
    import importlib.util

    cfg = prepared("training_rm", ["exp_manager.create_wandb_logger=True"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"exp_manager.create_wandb_logger=True needs the wandb package"):
        check_logger_packages(cfg)


# ---- every entry script names a trainer function that exists ---------------------------------------

def test_entry_scripts_name_existing_trainer_functions():
    for script in sorted((REPO / "examples" / "nlp" / "gpt").glob("*.py")):
        tree = ast.parse(script.read_text())
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "hydra_entry"]
        for call in calls:
            config_name, target = (a.value for a in call.args)
            assert (CONF_DIR / f"{config_name}.yaml").is_file(), script
            module, _, name = target.partition(":")
            source = REPO / (module.replace(".", "/") + ".py")
            defined = {n.name for n in ast.parse(source.read_text()).body if isinstance(n, ast.FunctionDef)}
            assert name in defined, f"{script.name}: {target} does not exist"


# ---- a real reward-model run through data_prefix ----------------------------------------------------

def _write_nemo_comparisons(path: Path, pairs: int, offset: int = 0) -> None:
    """NeMo's alternating {"text"} format, as the tutorial describes it: chosen line, then rejected."""
    lines = []
    for i in range(offset, offset + pairs):
        prompt = f"User: What is {i}+{i}?\nAssistant: "
        lines += [{"text": prompt + str(2 * i)}, {"text": prompt + "I refuse to answer this question."}]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


@pytest.mark.slow  # two real runs: ~35 s of CPU
def test_reward_model_reads_the_files_named_in_data_prefix(tmp_path):
    train, valid = tmp_path / "train_comparisons.jsonl", tmp_path / "test_comparisons.jsonl"
    _write_nemo_comparisons(train, 16)
    _write_nemo_comparisons(valid, 6, offset=100)
    tokenizer = tmp_path / "tokenizer"
    subprocess.run([sys.executable, "-m", "aligner.data.train_tokenizer", "--input", str(train), str(valid),
                    "--field", "text", "--vocab-size", "300", "--output", str(tokenizer)],
                   check=True, capture_output=True, env=child_env(), cwd=str(REPO), timeout=120)
    script = str(REPO / "examples" / "nlp" / "gpt" / "train_reward_model.py")
    common = [
        "trainer.num_nodes=1", "trainer.devices=1", "++model.micro_batch_size=2", "++model.global_batch_size=4",
        "++model.data.data_impl=jsonl", "pretrained_checkpoint.restore_from_path=null",
        "exp_manager.create_wandb_logger=False", "exp_manager.wandb_logger_kwargs.project=rm_training",
        "exp_manager.wandb_logger_kwargs.name=rm_training", "exp_manager.create_tensorboard_logger=False",
        f"model.tokenizer.model={tokenizer}", "trainer.rm.max_steps=2", "trainer.rm.val_check_interval=2",
        "trainer.rm.save_interval=0", "trainer.rm.limit_val_batches=100000", "model.num_layers=1",
        "model.hidden_size=32", "model.ffn_hidden_size=64", "model.num_attention_heads=2", "model.num_query_groups=1",
        "model.encoder_seq_length=32",
    ]
    env = child_env(ALIGNER_NUM_THREADS="1", OMP_NUM_THREADS="1")

    def run(log_dir: Path, validation: Path) -> subprocess.CompletedProcess:
        # cwd=tmp_path: the YAML's default data/movie_reviews/... files do not exist there
        prefix = f"model.data.data_prefix={{train: [{train}], validation: [{validation}], test: [{validation}]}}"
        return subprocess.run([sys.executable, script, *common, prefix, f"exp_manager.explicit_log_dir={log_dir}"],
                              capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300)

    ok = run(tmp_path / "rm", valid)
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 2 and any("val/accuracy" in r for r in rows)
    hparams = OmegaConf.load(tmp_path / "rm" / "csv" / "hparams.yaml")  # the config the trainer ran with
    assert hparams["model.data.train_ds.file_path"] == str(train)
    assert hparams["model.data.validation_ds.file_path"] == str(valid)

    missing = tmp_path / "no_such_validation.jsonl"
    failed = run(tmp_path / "rm_missing", missing)
    assert failed.returncode != 0
    assert str(missing) in failed.stdout + failed.stderr
