"""trainer.torch_threads (else env ALIGNER_NUM_THREADS) sets the process's torch threads; bad
values are refused naming where they came from."""
import pytest
import torch

from aligner.training.run import set_torch_threads


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_config_key_wins_over_environment(monkeypatch):
    monkeypatch.setenv("ALIGNER_NUM_THREADS", "2")
    set_torch_threads(1)
    assert torch.get_num_threads() == 1
    set_torch_threads(None)  # null: the environment's
    assert torch.get_num_threads() == 2


def test_nothing_set_leaves_torch_alone(monkeypatch):
    monkeypatch.delenv("ALIGNER_NUM_THREADS", raising=False)
    torch.set_num_threads(1)
    set_torch_threads(None)
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("configured,env,message", [
    (0, None, "trainer.torch_threads=0"),
    ("two", None, "trainer.torch_threads='two'"),
    (None, "-1", "env ALIGNER_NUM_THREADS='-1'"),
])
def test_bad_values_are_refused_by_name(monkeypatch, configured, env, message):
    if env is None:
        monkeypatch.delenv("ALIGNER_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("ALIGNER_NUM_THREADS", env)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        set_torch_threads(configured)
