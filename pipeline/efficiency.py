"""Stage efficiency@<model>: one entry's parameters, FLOPs and ms/image -> reports/efficiency/<model>.json.

The report stage gathers them into reports/efficiency.md and .csv.
"""

from pathlib import Path

import typer

from medfusion.config import load_params
from medfusion.data.io import write_json


def main(
    model: str = typer.Option(...),
    out: Path = typer.Option(...),
    size: int = typer.Option(256, help="input side for FLOPs and timing (the paper's 256)"),
    params_file: Path = Path("params.yaml"),
):
    from medfusion.efficiency import efficiency_row
    from medfusion.hardware import resolve_precision

    params = load_params(params_file)
    t = params.train
    row = efficiency_row(params, model, resolve_precision(t.device, t.cpu_bf16, t.channels_last), size)
    write_json(out, row)
    print(f"efficiency {model}: {row['parameters'] / 1e6:.2f} M parameters, {row['gflops']:.2f} GFLOPs, "
          f"{row['ms_per_image']:.1f} ms/image on {row['machine']}")  # fmt: skip


if __name__ == "__main__":
    typer.run(main)
