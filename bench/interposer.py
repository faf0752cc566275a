"""Latent conversion of 128x128 latents (SDXL at 1024 px) through the Interposer service vs in process.

    .venv/bin/python -m bench.interposer [--repeat N] [--size 128]

Random v4.0 weights (the published layout; timing does not depend on the values). The
service time is a client's Convert call with the latents already in Redis: the service reads
them, runs the network and writes the result. Ratio = service / in process.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from bench.timing import median_time
from services.common.api.baton.v1 import handles_pb2 as pb
from services.common.api.baton.v1 import interposer_pb2 as ipb
from services.common.api.baton.v1 import interposer_pb2_grpc
from services.common.blobs import BlobStore
from services.common.latent_spaces import get_space
from services.common.redis_conn import connect
from services.devkit.cluster import RedisServer, ServiceProcess
from services.interposer.net import InterposerNet, convert, load_interposer, weights_filename


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--size", type=int, default=128, help="latent side (128 = SDXL at 1024 px)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = root / weights_filename("xl", "v1")
        save_file(InterposerNet(4, 4).state_dict(), str(path))
        env = {"BATON_INTERPOSER_DIR": str(root), "HF_HUB_OFFLINE": "1"}
        with (
            RedisServer() as redis,
            ServiceProcess("interposer", redis.url, env, log=root / "interposer.log") as service,
        ):
            store = BlobStore(connect(redis.url, "no"))
            latents = torch.randn(1, 4, args.size, args.size)
            handle = pb.LatentHandle(blob=store.put_tensor(latents), space="sdxl", noise=pb.NoiseLevel(fraction=1.0))
            stub = interposer_pb2_grpc.InterposerStub(service.channel)
            request = ipb.ConvertRequest(latents=handle, target="sd1", method=ipb.CONVERSION_METHOD_NET)
            net = load_interposer(path, "xl", "v1")
            source, target = get_space("sdxl"), get_space("sd1")

            def in_process():
                convert(net, latents, source, target)

            in_process(), stub.Convert(request)  # warm both (the service loads its network on first use)
            base = median_time(in_process, args.repeat)
            ours = median_time(lambda: stub.Convert(request), args.repeat)
            print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeat}")
            print(f"{args.size}x{args.size} latents: in process {base * 1e3:.1f} ms, service {ours * 1e3:.1f} ms, "
                  f"ratio {ours / base:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
