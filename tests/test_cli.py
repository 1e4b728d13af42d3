import os
import subprocess
import sys

import pytest

from util.paths import PROJECT_ROOT


# A step of value optimisation in miniature: large activations of a few sizes, a temporary, all
# freed at the end; run warm, then measured. Minor page faults are the memory the kernel had to
# map in again because malloc gave it back (glibc maps each block above its threshold afresh).
STEP_FAULTS = """
import resource
import torch
from util.cli import run_cli


def step():
    a = torch.ones(12 * 2**20)
    b = torch.ones(10 * 2**20) * 2
    (a[: 10 * 2**20] + b).sum()


def main():
    for _ in range(3):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)


run_cli(main)
"""


def step_faults(system_malloc: bool) -> int:
    env = {k: v for k, v in os.environ.items() if k != "KEDIT_SYSTEM_MALLOC"}
    if system_malloc:
        env["KEDIT_SYSTEM_MALLOC"] = "1"
    result = subprocess.run([sys.executable, "-c", STEP_FAULTS], capture_output=True, text=True, timeout=120,
                            cwd=PROJECT_ROOT, env={**env, "PYTHONPATH": str(PROJECT_ROOT)})
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_cli_keeps_freed_memory_so_repeated_steps_do_not_fault_it_in_again():
    """run_cli's malloc setting: freed activations stay with the process and serve the next step,
    so ten warm steps of ~130 MB of tensors page-fault almost nothing; with KEDIT_SYSTEM_MALLOC=1
    (glibc's default) every step maps its large blocks afresh and faults them in again."""
    kept, system = step_faults(system_malloc=False), step_faults(system_malloc=True)
    assert kept * 10 < system, f"minor page faults over 10 steps: {kept} with the setting, {system} without"


def test_sigterm_and_ctrl_c_end_with_the_shell_exit_codes():
    """128 + the signal's number (143, 130), after the KeyboardInterrupt path (rollback and
    checkpoint in a run)."""
    codes = {}
    for signal_name in ("SIGTERM", "SIGINT"):
        # Python's own Ctrl-C handler, as in a foreground shell: a command started in the background
        # without job control (`cmd &` in a script, as CI may run the suite) inherits SIGINT
        # ignored, and Python then keeps it ignored
        script = ("import os, signal, time\nfrom util.cli import run_cli\n\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n\n\ndef main():\n"
                  f"    os.kill(os.getpid(), signal.{signal_name})\n    time.sleep(30)\n\n\nrun_cli(main)\n")
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                                cwd=PROJECT_ROOT, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
        codes[signal_name] = result.returncode
    assert codes == {"SIGTERM": 143, "SIGINT": 130}
