"""The benchmark report is built from tidy CSV rows: ratios first, then one table per benchmark."""

from benchmarks.common import COLUMNS, make_row, read_rows, write_rows
from benchmarks.make_report import collect, render


def test_rows_round_trip_and_report(tmp_path):
    rows = [make_row("training", "loralab-qlora", "B=4 T=128", "peak_tensor_bytes", 3 * 2**20, "B"),
            make_row("training", "loralab/hf-peft-qlora", "B=4 T=128", "peak_tensor_ratio", 0.83, "x")]
    write_rows(tmp_path / "training.csv", rows)
    back = read_rows(tmp_path / "training.csv")
    assert list(back[0]) == COLUMNS and back[1]["value"] == "0.83"
    (tmp_path / "gpu").mkdir()
    write_rows(tmp_path / "gpu" / "kernels.csv",
               [make_row("kernels", "triton/bf16-matmul", "M=1 28672x8192", "speedup", 3.1, "x")])
    text = render(collect(tmp_path), tmp_path)
    head = text.split("## Headline ratios")[1].split("\n## ")[0]
    assert "0.83x" in head and "3.10x" in head and "python benchmarks/training.py" in head
    assert "3.0 MiB" in text and "## kernels" in text and "## training" in text
