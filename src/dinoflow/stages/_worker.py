"""The pretrain stage's torchrun worker: ``torchrun --nproc_per_node=N -m dinoflow.stages._worker
--spec F [--result R]``.

Each process reads the pretrain spec, joins the process group (gloo on CPU, NCCL on GPU) and trains
its share; rank 0 writes the stage result JSON to ``--result``. Object-store settings come from the
``DINOFLOW_S3_*`` environment.
"""

from __future__ import annotations

import argparse
import logging
import os


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dinoflow.stages._worker")
    p.add_argument("--spec", required=True, help="pretrain spec JSON file")
    p.add_argument("--result", default=None, help="where rank 0 writes the result JSON")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    from dinoflow.stages.pretrain import PretrainSpec, train_from_spec
    from dinoflow.storage import open_store

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with open(a.spec) as f:
        spec = PretrainSpec.model_validate_json(f.read())
    result = train_from_spec(spec, open_store())
    if a.result and int(os.environ.get("RANK", "0")) == 0:
        tmp = a.result + ".tmp"
        with open(tmp, "w") as f:
            f.write(result.model_dump_json())
        os.replace(tmp, a.result)


if __name__ == "__main__":
    main()
