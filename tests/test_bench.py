"""The benchmark scripts run (tiny sizes, eager; their figures are not checked, only that they
are produced with the machine description) and refuse a missing GPU with exit 2."""

import pytest
import torch

from _train_utils import PYTHON, run_script
from mabn.lab import bench


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("script", ["scripts/bench_norm.py", "scripts/bench_step.py"])
def test_device_cuda_without_gpu_exits_2(script):
    r = run_script([PYTHON, script, "--device", "cuda"])
    assert r.returncode == 2, r.stderr[-3000:]
    assert "--device cuda: no CUDA GPU is available" in r.stderr and "Traceback" not in r.stderr


def test_bench_step_writes_its_report(tmp_path):
    out = tmp_path / "speed.md"
    r = run_script([PYTHON, "scripts/bench_step.py", "--arch", "resnet18", "--batch", "4", "--image-size", "32",
                    "--iters", "2", "--warmup", "0", "--modes", "eager", "--threads", "1", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    for needle in ("- Command: `python scripts/bench_step.py --arch resnet18", "- Machine: ", "torch "
                   + torch.__version__, "1 intra-op threads", "- Date: ", "| nchw | eager |", "| channels_last | eager |"):
        assert needle in text, needle
    row = next(line for line in text.splitlines() if line.startswith("| nchw | eager |")).split("|")
    bn, mabn_ms, ratio = float(row[3]), float(row[4]), float(row[5])
    assert bn > 0 and mabn_ms > 0 and ratio == pytest.approx(mabn_ms / bn, rel=0.01, abs=0.001)
    # The paired columns against the per-round table: round r's MABN step over its BN step.
    low, high = paired_interval(text, "nchw eager MABN", "nchw eager BN")
    assert within(float(row[6]), low, high)  # the median of two is their mean
    mean, se = (float(v) for v in row[7].split("±"))
    assert within(mean, low, high)
    assert within(se, *half_difference_interval(text, "nchw eager MABN", "nchw eager BN"))


def _round_ratios(text, num, den):
    """Each round's (low, high) bounds of step ``num`` / step ``den`` from the per-round table,
    which prints 0.1 ms: each step is known to within half a unit (0.05 ms)."""
    lines = text.splitlines()
    head = lines.index(next(line for line in lines if line.startswith("| round | ")))
    cols = [c.strip() for c in lines[head].split("|")[1:-1]]
    rounds = [[float(c) for c in line.split("|")[1:-1]] for line in lines[head + 2:] if line.startswith("| ")]
    assert [r[0] for r in rounds] == list(range(1, len(rounds) + 1))
    half = 0.05
    return [((r[cols.index(num)] - half) / (r[cols.index(den)] + half),
             (r[cols.index(num)] + half) / (r[cols.index(den)] - half)) for r in rounds]


def paired_interval(text, num, den):
    """Bounds of the mean over two rounds (= their median) of num / den."""
    bounds = _round_ratios(text, num, den)
    assert len(bounds) == 2
    return sum(b[0] for b in bounds) / 2, sum(b[1] for b in bounds) / 2


def half_difference_interval(text, num, den):
    """Bounds of std / sqrt(2) of the two rounds' ratios, i.e. half their difference."""
    (l0, h0), (l1, h1) = _round_ratios(text, num, den)
    spread = [abs(a - b) / 2 for a in (l0, h0) for b in (l1, h1)]
    return (min(spread) if (h0 < l1 or h1 < l0) else 0.0), max(spread)


def within(value, low, high, printed=0.0005):
    """value (printed to three decimals) lies in [low, high]."""
    return low - printed <= value <= high + printed


def test_bench_step_splits_mabn_by_bn_with_centralized_convolutions(tmp_path):
    out = tmp_path / "speed.md"
    r = run_script([PYTHON, "scripts/bench_step.py", "--arch", "resnet18", "--batch", "4", "--image-size", "32",
                    "--iters", "2", "--warmup", "0", "--modes", "eager", "--layouts", "nchw", "--threads", "1",
                    "--bn-wc", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    assert "BN+WC = BN with weight-centralized convolutions" in text and "nchw eager BN+WC" in text
    row = next(line for line in text.splitlines()
               if line.startswith("| nchw | eager |") and line.count("±") == 2).split("|")
    for col, num, den in ((4, "nchw eager BN+WC", "nchw eager BN"), (6, "nchw eager MABN", "nchw eager BN+WC")):
        low, high = paired_interval(text, num, den)
        assert within(float(row[col]), low, high)
        assert within(float(row[col + 1].split("±")[0]), low, high)


def test_bench_step_refuses_bad_sizes():
    r = run_script([PYTHON, "scripts/bench_step.py", "--batch", "5", "--modes", "eager"])
    assert r.returncode == 2 and "--batch=5 is not divisible by --norm-batch-size=2" in r.stderr, r.stderr[-3000:]


def test_bench_norm_eager_table(tmp_path):
    out = tmp_path / "norm.md"
    r = run_script([PYTHON, "scripts/bench_norm.py", "--shapes", "4x8x4x4", "--repeats", "1", "--warmup", "0",
                    "--allocator", "keep", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    assert "| 4x8x4x4 | " in text and "MABN2d (b=2) ms (x BN)" in text and "(1.00x)" in text
    assert "- device: " in text and "Compilation" not in text
    assert "CPU memory: glibc malloc keeping freed memory (--allocator keep" in text
    assert "eager mabn layers on the CPU: mabn's C++ kernels (mabn.kernels auto, built)" in text or \
        "eager mabn layers on the CPU: torch operations (mabn.kernels auto, but the kernels failed to build)" in text


def test_machine_line_names_the_cpu_kernel_path(monkeypatch):
    """Every benchmark's machine line says which path eager mabn layers take on the CPU: torch
    operations (switched off, or the C++ kernels failed to build), the kernels, or not built yet."""
    from mabn import kernels
    cpu = torch.device("cpu")
    monkeypatch.setattr(kernels, "MODE", "off")
    assert "eager mabn layers on the CPU: torch operations (MABN_CPU_KERNELS" in bench.machine_description(cpu)
    monkeypatch.setattr(kernels, "MODE", "auto")
    for module, expect in ((None, "not built yet"), (False, "failed to build"), (len, "mabn's C++ kernels")):
        monkeypatch.setattr(kernels, "_module", module)
        assert expect in bench.machine_description(cpu), module


_RSS_AFTER_FREE = """
import sys, torch
from mabn.lab import bench
if sys.argv[1] == "keep":
    bench.set_allocator("keep")
page = __import__("os").sysconf("SC_PAGE_SIZE")
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
t = torch.empty(64 << 20)  # 256 MiB, written below so that every page is resident
t.fill_(1.0)
before = rss()
del t
print((before - rss()) >> 20)
"""


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc's mallopt and /proc")
def test_allocator_keep_retains_freed_memory():
    """By default glibc returns a freed 256 MiB tensor to the OS (the resident size drops by it:
    the next allocation pays first-touch page faults again); with set_allocator("keep") the
    memory stays resident for reuse."""
    released = {}
    for mode in ("default", "keep"):
        r = run_script([PYTHON, "-c", _RSS_AFTER_FREE, mode])
        assert r.returncode == 0, r.stderr[-3000:]
        released[mode] = int(r.stdout.split()[-1])
    assert released["default"] > 200, released
    assert released["keep"] < 32, released


def test_allocator_rejects_unknown_names():
    from mabn.lab import bench
    with pytest.raises(ValueError, match="--allocator 'huge'"):
        bench.set_allocator("huge")


def test_bench_floor_report_and_floor_arithmetic(tmp_path):
    """bench_floor's floor column is 8 full-tensor passes of 4-byte elements at the copy
    bandwidth it printed (recomputed here from the report), and bad shapes exit 2."""
    import re
    out = tmp_path / "floor.md"
    r = run_script([PYTHON, "scripts/bench_floor.py", "--mib", "8", "--shapes", "4x8x16x16", "--repeats", "2",
                    "--threads", "1", "--allocator", "keep", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    assert "CPU memory: glibc malloc keeping freed memory" in text and "1 intra-op threads" in text
    copy = float(re.search(r"copy ([0-9.]+) GB/s", text).group(1))
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| 4x8x16x16 |")]
    assert [c.strip() for c in (rows[0][1], rows[1][1])] == ["NCHW", "channels_last"]
    for row in rows:
        floor_ms = float(row[2])
        assert floor_ms == pytest.approx(8 * 4 * 8 * 16 * 16 * 4 / (copy * 1e9) * 1e3, abs=0.006)
        bn, mabn = float(row[4]), float(row[5])
        # the ratio comes from the unrounded times; the printed ones are rounded to 0.005 ms
        slack = mabn / bn * (0.005 / bn + 0.005 / mabn) + 0.005
        assert float(row[6].strip().rstrip("x")) == pytest.approx(mabn / bn, abs=slack)
    bad = run_script([PYTHON, "scripts/bench_floor.py", "--shapes", "4x8x16"])
    assert bad.returncode == 2 and "--shapes must look like 32x256x56x56" in bad.stderr


def test_bench_inference_machine_line_and_bad_sizes(tmp_path):
    """bench_inference's report carries the shared machine line (allocator and input-gradient path
    included) and a size the models cannot train at is refused by name, before any work."""
    r = run_script([PYTHON, "scripts/bench_inference.py", "--image-size", "32"])
    assert r.returncode == 2 and "--image-size=32 must be >= 64" in r.stderr, r.stderr[-2000:]
    r = run_script([PYTHON, "scripts/bench_inference.py", "--train-iters", "0"])
    assert r.returncode == 2 and "--train-iters=0 must be >= 1" in r.stderr, r.stderr[-2000:]
    out = tmp_path / "inf.md"
    r = run_script([PYTHON, "scripts/bench_inference.py", "--arch", "resnet18", "--batch-sizes", "1", "--repeats", "1",
                    "--min-time", "0.01", "--image-size", "64", "--no-train", "--threads", "1", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    machine = next(line for line in out.read_text().splitlines() if line.startswith("- Machine: "))
    for needle in ("CPU memory: ", "eager mabn layers on the CPU: ", "torchvision ", "Python "):
        assert needle in machine, needle


def test_round_robin_reverses_the_order_every_other_round():
    calls, progress = [], []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    times = bench.round_robin(fns, repeats=3, warmup=1, device=torch.device("cpu"),
                              progress=lambda r, last: progress.append((r, list(last))))
    # warm-up round 0 in the given order, then reversed, given, reversed
    assert calls == ["a", "b", "c", "c", "b", "a", "a", "b", "c", "c", "b", "a"]
    assert list(times) == ["a", "b", "c"] and all(len(v) == 3 and min(v) >= 0 for v in times.values())
    assert progress == [(1, ["a", "b", "c"]), (2, ["a", "b", "c"]), (3, ["a", "b", "c"])]


def test_bench_norm_network_total_is_the_count_weighted_sum(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    out = tmp_path / "net.md"
    r = run_script([PYTHON, "scripts/bench_norm.py", "--network", "resnet18", "--batch", "4", "--image-size", "32",
                    "--presets", "mabn", "--repeats", "1", "--warmup", "0", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| ")]
    head, body = [c.strip() for c in lines[0]], lines[1:]
    assert head == ["shape", "layers", "nn.BatchNorm2d ms (x BN)", "MABN2d (b=2) ms (x BN)"]
    rows, total = body[:-1], body[-1]
    counts = {row[0].strip(): int(row[1]) for row in rows}
    # torchvision's resnet18 at 32 px: the stem's BN at 16x16, then its four stages at 8, 4, 2, 1 px.
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in torchvision.models.resnet18().modules())
    assert sum(counts.values()) == n_bn == int(total[1]) == 20
    assert counts == {"4x64x16x16": 1, "4x64x8x8": 4, "4x128x4x4": 5, "4x256x2x2": 5, "4x512x1x1": 5}
    for col in (2, 3):
        ms = [float(row[col].split("(")[0]) for row in rows]
        step = float(total[col].split("(")[0].strip(" *"))
        # rows print 0.01 ms and the total 0.1 ms: the rounding bound is 20 x 0.005 + 0.05 ms
        assert abs(step - sum(c * t for c, t in zip(counts.values(), ms))) <= 20 * 0.005 + 0.05 + 1e-9


def test_bench_norm_refuses_bad_shapes():
    r = run_script([PYTHON, "scripts/bench_norm.py", "--shapes", "3x8x4x4"])
    assert r.returncode == 2 and "N=3 is not divisible by --norm-batch-size=2" in r.stderr, r.stderr[-3000:]
    r = run_script([PYTHON, "scripts/bench_norm.py", "--shapes", "8x4x4"])
    assert r.returncode == 2 and "--shapes '8x4x4': expected NxCxHxW" in r.stderr, r.stderr[-3000:]


@pytest.mark.parametrize("layout", [[], ["--channels-last"]], ids=["nchw", "channels_last"])
def test_bench_kernels_table_adds_up(tmp_path, layout):
    from mabn import kernels
    if kernels.MODE != "auto" or kernels.load() is None:
        pytest.skip("mabn's C++ kernels are off or cannot be built here")
    out = tmp_path / "kernels.md"
    r = run_script([PYTHON, "scripts/bench_kernels.py", "--shapes", "4x8x4x4", "--repeats", "1", "--warmup", "0",
                    "--threads", "1", "--out", str(out)] + layout)
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    assert "- command: `python scripts/bench_kernels.py --shapes 4x8x4x4" in text and "- device: " in text
    lines = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| ")]
    head = [c.strip() for c in lines[0]]
    row = dict(zip(head, (c.strip() for c in lines[1])))
    assert row["shape"] == "4x8x4x4"
    ms = {k: float(v) for k, v in row.items() if k.endswith(" ms")}
    four = ms["sums(x, x) ms"] + ms["sums(dout, x) ms"] + ms["scale_shift ms"] + ms["multiply_adds ms"]
    assert abs(ms["mabn kernels ms"] - four) <= 5 * 0.0005 + 1e-9  # five printed values, 0.001 ms each
    assert abs(ms["BN calls ms"] - ms["bn forward ms"] - ms["bn backward ms"]) <= 3 * 0.0005 + 1e-9
    assert all(v >= 0 for v in ms.values()) and ms["BN calls ms"] > 0  # (a 512-value copy may print 0.000)


def test_bench_kernels_refuses_bad_shapes():
    r = run_script([PYTHON, "scripts/bench_kernels.py", "--shapes", "3x8x4x4"])
    assert r.returncode == 2 and "N=3 is not divisible by --norm-batch-size=2" in r.stderr, r.stderr[-3000:]
