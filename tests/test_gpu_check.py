"""``bench/gpu_check.py --device cpu --dry-run`` runs (tiny model, 2 frames a row), so the GPU check cannot rot."""
import sys

from host.inprocess import BENCH_DIR


def test_gpu_check_dry_run_prints_one_table_with_every_row(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    import gpu_check

    out = tmp_path / "gpu_check.md"
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--device", "cpu", "--dry-run", "--out", str(out)])
    gpu_check.main()
    text = out.read_text()
    assert text in capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| bank")]
    per_bank = sum(len(modes or gpu_check.MODES) for *_, modes in gpu_check.GUIDANCE)
    assert len(rows) == len(gpu_check.BANKS) * per_bank
    for bank in gpu_check.BANKS:
        for mode in gpu_check.MODES:
            assert f"| {bank} | {mode} | cfg 1 |" in text and f"| {bank} | {mode} | RCFG, cfg 2 |" in text
        assert f"| {bank} | off | full CFG, cfg 2 |" in text
    assert all(float(row.split("|")[4]) > 0 for row in rows)  # fps
