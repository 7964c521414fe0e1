"""Python reward functions from the config: loading (errors name the key), calling with the
batch's fields, weighting, and failures (raise, NaN, wrong length, bad output, crash, hang in
Python or in C) that leave the caller alive, get the fallback, are counted and logged once.

The functions live in tests/unit/reward_fixtures.py and run in real worker processes.
"""
import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from aligner.rollout.function_loader import FunctionPathError, load_function, parse_function_path
from aligner.rollout.reward_functions import RewardConfigError, RewardFunctions, parse_reward_functions
from aligner.rollout.reward_worker import as_scores, keyword_filter

pytestmark = pytest.mark.timeout(300)

FIX = "tests.unit.reward_fixtures"
PROMPTS = ["1+1=", "2+2=", "3+3=", "4+4="]
RESPONSES = ["2", "5", "66", ""]
FIELDS = {"answer": [2, 4, 6, 8], "difficulty": [1, 1, 2, 2]}


def _functions(*entries, timeout_s=60.0, fallback=0.0, base_dir=None):
    specs = parse_reward_functions([e if isinstance(e, dict) else {"path": e} for e in entries], base_dir=base_dir)
    return RewardFunctions(specs, timeout_s=timeout_s, fallback=fallback)


def _score(fns):
    return fns(PROMPTS, RESPONSES, **FIELDS)


# --- loading ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["no_colon", "pkg.mod:", ":fn", "a b:fn", "pkg.mod:1fn", 3])
def test_bad_path_syntax_names_the_key(path):
    with pytest.raises(FunctionPathError, match=r"reward\.functions\[0\]\.path"):
        parse_reward_functions([{"path": path}])


def test_load_errors_name_the_key_and_the_problem(tmp_path):
    cases = {
        "no_such_module_xyz.sub:f": "no module named 'no_such_module_xyz'",
        f"{tmp_path}/missing.py:f": "does not exist",
        f"{FIX}:answer_plus_lenght": "did you mean 'answer_plus_length'",
        f"{FIX}:NOT_A_FUNCTION": "not a function",
    }
    for path, problem in cases.items():
        with pytest.raises(FunctionPathError, match=r"reward\.functions\[1\]\.path") as e:
            parse_reward_functions([{"path": f"{FIX}:ones"}, {"path": path}])
        assert problem in str(e.value), str(e.value)
    broken = tmp_path / "broken.py"
    broken.write_text("raise ImportError('needs a package')\n")
    with pytest.raises(FunctionPathError, match="ImportError: needs a package"):
        load_function(f"{broken}:f", "reward.functions[0].path")


def test_config_entry_errors():
    with pytest.raises(RewardConfigError, match=r"reward\.functions\[0\] has unknown key\(s\) \['wieght'\]"):
        parse_reward_functions([{"path": f"{FIX}:ones", "wieght": 2}])
    with pytest.raises(RewardConfigError, match=r"reward\.functions\[0\]\.path is missing"):
        parse_reward_functions([{"weight": 2}])
    with pytest.raises(RewardConfigError, match=r"reward\.functions\[0\]\.weight"):
        parse_reward_functions([{"path": f"{FIX}:ones", "weight": "high"}])
    with pytest.raises(RewardConfigError, match="both named 'ones'"):
        parse_reward_functions([f"{FIX}:ones", f"{FIX}:ones"])
    with pytest.raises(RewardConfigError, match=r"reward\.timeout_s"):
        RewardFunctions(parse_reward_functions([f"{FIX}:ones"]), timeout_s=0)
    with pytest.raises(RewardConfigError, match=r"reward\.fallback"):
        RewardFunctions(parse_reward_functions([f"{FIX}:ones"]), timeout_s=1, fallback=math.nan)


def test_parse_function_path_kinds():
    assert parse_function_path("a.b:c", "k") == ("module", "a.b", "c")
    assert parse_function_path("dir/x.py:Cls.method", "k") == ("file", "dir/x.py", "Cls.method")


# --- calling ---------------------------------------------------------------------------------


def test_import_path_function_gets_the_fields_and_weights_apply():
    with _functions({"path": f"{FIX}:answer_plus_length", "weight": 2.0},
                    {"path": f"{FIX}:count_kwargs", "weight": 0.5, "name": "kw"}) as fns:
        result = _score(fns)
    first = [2 + 1, 4 + 1, 6 + 2, 8 + 0]  # answer + len(response)
    second = [400.0 + i for i in range(4)]  # four keywords: prompts, responses, answer, difficulty
    assert result.per_function["answer_plus_length"].tolist() == first
    assert result.per_function["kw"].tolist() == second
    assert result.rewards.tolist() == [2 * a + 0.5 * b for a, b in zip(first, second)]
    assert result.rewards.dtype == torch.float32 and result.valid.all()
    assert all(v == 0 for v in result.counts.values())


def test_file_path_function_absolute_and_relative(tmp_path):
    (tmp_path / "my_reward.py").write_text(textwrap.dedent("""
        def length(prompts, responses):
            return [float(len(r)) for r in responses]
    """))
    with _functions(f"{tmp_path}/my_reward.py:length") as fns:
        assert _score(fns).rewards.tolist() == [1.0, 1.0, 2.0, 0.0]
    with _functions("my_reward.py:length", base_dir=str(tmp_path)) as fns:
        assert _score(fns).rewards.tolist() == [1.0, 1.0, 2.0, 0.0]


def test_none_marks_samples_invalid_and_is_counted():
    with _functions(f"{FIX}:none_for_odd", f"{FIX}:ones") as fns:
        result = _score(fns)
    assert result.valid.tolist() == [True, False, True, False]
    assert result.rewards.tolist() == [3.0, 0.0, 3.0, 0.0]
    assert result.counts["none_for_odd/none"] == 2 and result.counts["invalid"] == 2
    assert result.per_function["none_for_odd"].isnan().tolist() == [False, True, False, True]


def test_prints_do_not_corrupt_the_protocol():
    with _functions(f"{FIX}:noisy") as fns:
        assert _score(fns).rewards.tolist() == [3.0] * 4
        assert _score(fns).rewards.tolist() == [3.0] * 4


@pytest.mark.parametrize("name,kind,failed", [
    ("raises", "error", 4), ("nan_for_first", "nonfinite", 1), ("wrong_length", "wrong_length", 4),
    ("not_numbers", "bad_output", 4), ("exits", "error", 4),
])
def test_failures_get_the_fallback_are_counted_and_logged_once(caplog, name, kind, failed):
    caplog.set_level(logging.WARNING, logger="aligner.rollout.reward")
    with _functions(f"{FIX}:{name}", {"path": f"{FIX}:ones", "weight": 10.0}, fallback=-1.0) as fns:
        for _ in range(2):
            result = _score(fns)
            assert result.counts[f"{name}/{kind}"] == failed
            assert result.counts[f"{name}/failed"] == failed
            assert result.valid.all()
            own = result.per_function[name].tolist()
            assert own.count(-1.0) == failed
            assert result.rewards.tolist() == [10.0 + v for v in own]  # the healthy function still counts
        assert fns.totals[f"{name}/failed"] == 2 * failed and fns.totals["calls"] == 2
    logged = [r for r in caplog.records if name in r.getMessage()]
    assert len(logged) == 1, [r.getMessage() for r in caplog.records]
    if name == "raises":
        assert "RuntimeError: boom from the reward function" in logged[0].getMessage()
        assert "Traceback" in logged[0].getMessage()


def test_fallback_none_marks_failures_invalid():
    with _functions(f"{FIX}:raises", fallback=None) as fns:
        result = _score(fns)
    assert not result.valid.any() and result.rewards.tolist() == [0.0] * 4
    assert result.counts["raises/failed"] == 4 and result.counts["invalid"] == 4


@pytest.mark.parametrize("name", ["sleeps", "busy_loop", "regex_backtracking"])
def test_hanging_function_times_out_and_the_worker_is_replaced(caplog, name):
    caplog.set_level(logging.WARNING, logger="aligner.rollout.reward")
    with _functions(f"{FIX}:{name}", f"{FIX}:ones", timeout_s=1.0, fallback=0.5) as fns:
        _score(fns)  # the first call also waits for the workers to import their functions
        old_pid = fns._workers[0].proc.pid
        start = time.monotonic()
        result = _score(fns)
        elapsed = time.monotonic() - start
        assert elapsed < 1.0 + 10.0, elapsed  # the deadline, plus slack for a loaded machine
        assert result.counts[f"{name}/timeout"] == 4
        assert result.per_function[name].tolist() == [0.5] * 4
        assert result.per_function["ones"].tolist() == [1.0] * 4
        assert result.rewards.tolist() == [1.5] * 4
        assert fns._workers[0].proc.pid != old_pid
        assert not _alive(old_pid)
    assert sum("timeout" in r.getMessage() for r in caplog.records) == 1


def test_workers_stop_on_close():
    fns = _functions(f"{FIX}:ones", f"{FIX}:sleeps", timeout_s=0.5)
    _score(fns)
    pids = [w.proc.pid for w in fns._workers]
    fns.close()
    assert not any(_alive(p) for p in pids)


def test_workers_die_with_a_killed_parent(tmp_path):
    """SIGKILL leaves the parent no chance to clean up: the workers must go on their own."""
    # One worker idle, one inside time.sleep(1000) in the middle of a call (it will never read
    # its stdin again, so only the kernel's parent-death signal can stop it).
    script = textwrap.dedent(f"""
        import sys, threading, time
        sys.path.insert(0, {os.getcwd()!r})
        from aligner.rollout.reward_functions import RewardFunctions, parse_reward_functions
        fns = RewardFunctions(parse_reward_functions(["{FIX}:ones", "{FIX}:sleeps"]), timeout_s=600)
        threading.Thread(target=fns, args=(["p"], ["r"]), daemon=True).start()
        while not all(w.ready for w in fns._workers):
            time.sleep(0.05)
        time.sleep(0.5)  # the request is written right after the workers are ready
        print(" ".join(str(w.proc.pid) for w in fns._workers), flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 20
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids)
    finally:
        if parent.poll() is None:
            parent.kill()


def _alive(pid):
    """True if the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_field_checks():
    with _functions(f"{FIX}:ones") as fns:
        with pytest.raises(ValueError, match="field 'answer' has 1 values for 4 responses"):
            fns(PROMPTS, RESPONSES, answer=[1])
        with pytest.raises(ValueError, match="may not be called 'prompts'"):
            fns(PROMPTS, RESPONSES, **{"prompts": PROMPTS})


# --- worker helpers --------------------------------------------------------------------------


def test_as_scores_and_keyword_filter():
    assert as_scores([1, None, 2.5, True]) == [1.0, None, 2.5, 1.0]
    assert as_scores(torch.tensor([1.0, 2.0])) == [1.0, 2.0]
    for bad in ("1", 3.0, {"a": 1}, [object()]):
        with pytest.raises(TypeError):
            as_scores(bad)

    def f(prompts, responses, answer):
        pass

    def g(prompts, **kw):
        pass

    kwargs = {"prompts": 1, "responses": 2, "answer": 3, "extra": 4}
    assert keyword_filter(f)(kwargs) == {"prompts": 1, "responses": 2, "answer": 3}
    assert keyword_filter(g)(kwargs) == kwargs
