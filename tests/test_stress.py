"""Issue 10, "Done when": processes downloading the same large file and the
same many-file tree into one destination at the same time, round after
round, against the real nginx on loopback.  Every process that exits 0 must
have left byte-identical files (checked the moment it exits, before the
others finish); no process may fail for a reason that is not true; no
`.part` (or companion) may be left after the last one.

Sizes (CTADATA_STRESS):

  (unset)  4 processes, a 32 MiB file and 400 files of 4 KiB in 8 folders,
           3 rounds: 2-3.5 s a round before the fix, 0.8 s with it (every
           CI run: enough for every round of the code before issue 10's fix to fail)
  full     4 processes, a 1 GiB file and 5,000 files of 16 KiB in 50
           folders (the bench's many/), 10 rounds: the issue's size; before the fix
           22-56 s a round, 7.7 min in all (2 cores, load average ~10);
           with the fix 6-15 s a round, 2.2 min in all (the processes share
           the work: each waits for the files another one has in hand)
  off      skipped

Each round starts from an empty destination; the four processes are started
together, then held at a gate and released at once (round 0), or released
with 10 ms / 50 ms / 200 ms between them (the other rounds), so that they
meet in different phases: listing, the big file, the small ones.
"""

import os
import shutil
import time
from pathlib import Path

import pytest

import runs
from runs import MiB, honest, leftovers

MODE = os.environ.get("CTADATA_STRESS", "").strip().lower() or "ci"
SIZES = {
    "ci": dict(big=32 * MiB, files=400, dirs=8, small=4096, rounds=3),
    "full": dict(big=1024 * MiB, files=5000, dirs=50, small=16384, rounds=10),
}
PROCESSES = 4
STAGGER = [0.0, 0.01, 0.05, 0.2]


@pytest.fixture
def stress_folder(nginx_server, request):
    if MODE == "off":
        pytest.skip("CTADATA_STRESS=off")
    if MODE not in SIZES:
        pytest.fail("CTADATA_STRESS must be unset, 'full' or 'off', not %r" % MODE)
    from conftest import DavTarget, _folder_name
    target = DavTarget(nginx_server, _folder_name(request.node.name))
    target.root.mkdir()
    try:
        yield target
    finally:
        shutil.rmtree(str(target.root), ignore_errors=True)


def make_data(root, big, files, dirs, small):
    """root/big.bin (random) and root/tree/dNN/fNNNNN.bin; returns the
    sorted relative paths of all files."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with open(str(root / "big.bin"), "wb") as f:
        left = big
        while left:
            n = min(left, 16 * MiB)
            f.write(os.urandom(n))
            left -= n
    rels = ["big.bin"]
    for i in range(files):
        rel = "tree/d%02d/f%05d.bin" % (i % dirs, i)
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(os.urandom(small - (i % 7)))
        rels.append(rel)
    return sorted(rels)


def same_file(a, b):
    """Byte comparison, in 1 MiB blocks."""
    try:
        with open(str(a), "rb") as fa, open(str(b), "rb") as fb:
            while True:
                x, y = fa.read(MiB), fb.read(MiB)
                if x != y:
                    return False
                if not x:
                    return True
    except OSError:
        return False


def differences(src, dst, rels):
    """The relative paths whose copy below *dst* is missing or differs,
    plus anything below *dst* that is not in *rels* (leftovers)."""
    bad = [r for r in rels if not same_file(Path(src) / r, Path(dst) / r)]
    have = set(str(p.relative_to(dst)) for p in Path(dst).rglob("*") if not p.is_dir())
    return bad + sorted(have - set(rels))


def test_four_processes_one_file_and_one_tree_into_one_destination(stress_folder,
                                                                   tmp_path):
    """Four `ctadata get -r stress DEST/` at once (stress/ holds the big file
    and the tree), several rounds.

    Before the fix: in every round all 4 processes exit 1, each with 8-50 (CI size)
    or 90-330 (full size) false "failed: ...: No such file or directory"
    lines; the files end up right."""
    size = SIZES[MODE]
    src = stress_folder.root / "stress"
    t0 = time.monotonic()
    rels = make_data(src, size["big"], size["files"], size["dirs"], size["small"])
    made = time.monotonic() - t0
    home = tmp_path / "home"
    home.mkdir()
    problems, timings = [], []
    for rnd in range(size["rounds"]):
        dest = tmp_path / ("round%02d" % rnd)
        dest.mkdir()
        out = dest / "stress"
        stagger = STAGGER[rnd % len(STAGGER)]

        def snapshot(out=out):
            # without the others' NAME.part: a process that finds a file done
            # makes an empty part (O_EXCL, to lock it) before it looks, then
            # removes it; parts left behind are counted once all have exited
            return [r for r in differences(src, out, rels) if ".part" not in r]

        procs = [runs.Run(stress_folder.url, ["get", "-r", "stress", str(dest) + "/"],
                          home, stress_folder.token, on_exit=snapshot, gate=True)
                 for _ in range(PROCESSES)]
        time.sleep(0.3)  # every interpreter has started and waits at the gate
        began = time.monotonic()
        for p in procs:
            p.release()
            if stagger:
                time.sleep(stagger)
        for p in procs:
            p.wait(600)
        took = time.monotonic() - began
        timings.append(round(took, 2))
        for i, p in enumerate(procs):
            if p.code == 0 and p.snapshot != []:
                problems.append("round %d, process %d: exit 0 with %s wrong or extra "
                                "files, e.g. %s" % (rnd, i, len(p.snapshot), p.snapshot[:3]))
            if not honest(p):
                lines = p.err.splitlines()
                first = [ln for ln in lines if ln.startswith("ctadata: ")][:1]
                last = [ln for ln in lines if ln.startswith("get: ")][-1:]
                problems.append("round %d, process %d: exit %s: %s" % (
                    rnd, i, p.code, " / ".join(last + first) or p.err[-300:]))
        left = leftovers(dest)
        if left:
            problems.append("round %d: %d partial files left: %s" % (rnd, len(left),
                                                                      left[:3]))
        if differences(src, out, rels):
            problems.append("round %d: the final tree is wrong" % rnd)
        shutil.rmtree(str(dest), ignore_errors=True)
    print("stress %s: data made in %.1f s; rounds took %s s" % (MODE, made, timings))
    assert problems == [], "\n".join(problems[:12] + ["(%d problems, rounds took %s s)"
                                                      % (len(problems), timings)])


def test_the_stress_harness_sees_a_wrong_file(tmp_path):
    """The checker itself: one flipped byte, a missing file or a leftover is
    seen (so that the stress test can fail)."""
    src = tmp_path / "src"
    rels = make_data(src, 3 * MiB, 20, 3, 1000)
    dst = tmp_path / "dst"
    shutil.copytree(str(src), str(dst))
    assert differences(src, dst, rels) == []
    p = dst / "big.bin"
    data = bytearray(p.read_bytes())
    data[2 * MiB + 5] ^= 1
    p.write_bytes(bytes(data))
    (dst / "tree/d01/f00001.bin").unlink()
    (dst / "tree/d02/f00002.bin.part").write_bytes(b"x")
    assert differences(src, dst, rels) == ["big.bin", "tree/d01/f00001.bin",
                                           "tree/d02/f00002.bin.part"]
