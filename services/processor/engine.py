"""ProcessorEngine: runs processor chains over latent handles. Plain Python over the registry.

Chains map to inputs in order (`+` separates them). The other chains run first, so that a
multi-input processor (blend) in the first chain can take their results; the first chain's
result is what a stage hands on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc
import torch

from services.common.api.baton.v1 import handles_pb2 as pb
from services.common.api.baton.v1 import interposer_pb2 as ipb
from services.common.api.baton.v1 import interposer_pb2_grpc
from services.common.api.baton.v1 import processor_pb2 as ppb
from services.common.blobs import BlobStore
from services.common.errors import BatonError, FailedPrecondition, InvalidArgument, Unavailable
from services.common.limits import DEFAULT, Limits
from services.common.processor_uri import check_chains
from services.common.tensors import check_finite
from services.common.workers import Worker, WorkerPool
from services.processor.registry import REGISTRY, Context, Latents

METHODS = {"net": ipb.CONVERSION_METHOD_NET, "vae": ipb.CONVERSION_METHOD_VAE, "auto": ipb.CONVERSION_METHOD_AUTO}


class InterposerClient:
    """Calls Convert on an interposer worker through the WorkerPool (the one way workers are
    called), from the processor's torch thread, within the Process call's deadline."""

    def __init__(self, pool: WorkerPool):
        self.pool = pool
        self.loop: asyncio.AbstractEventLoop | None = None

    async def bind(self) -> None:
        """Remembers the server's event loop, where the pool's channels live."""
        self.loop = asyncio.get_running_loop()

    def __call__(
        self, handle: pb.LatentHandle, target: str, method: str, source_model: str, target_model: str, deadline: float
    ) -> pb.LatentHandle:
        if self.loop is None:
            raise Unavailable("the processor is not serving yet")
        request = ipb.ConvertRequest(
            latents=handle, target=target, method=METHODS[method], source_model=source_model, target_model=target_model
        )

        async def convert(channel, worker: Worker, timeout: float) -> pb.LatentHandle:
            return (await interposer_pb2_grpc.InterposerStub(channel).Convert(request, timeout=timeout)).latents

        async def call() -> pb.LatentHandle:
            try:
                return await self.pool.call("interposer", convert, deadline=deadline, what="the interposer processor")
            except grpc.aio.AioRpcError as exc:
                raise FailedPrecondition(f"the interposer refused: {exc.details()}") from exc

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result()


class ProcessorEngine:
    def __init__(self, store: BlobStore, device: str, convert: Callable | None = None, limits: Limits = DEFAULT):
        self.store = store
        self.limits = limits
        self.device = device
        self.convert = convert

    @torch.no_grad()
    def process(self, req: ppb.ProcessRequest, deadline: float | None = None) -> ppb.ProcessResponse:
        """Runs the request's chains; `deadline` (a time.time()) bounds calls to other workers."""
        deadline = deadline or time.time() + 600
        if not req.inputs:
            raise InvalidArgument("at least one input is required", field="inputs")
        try:
            known = {n: d.info() for n, d in REGISTRY.items()}
            chains = check_chains(req.processors, len(req.inputs), known, self.limits)
        except BatonError as exc:
            raise exc.at(field="processors") from exc
        inputs = []
        for n, handle in enumerate(req.inputs):
            try:
                tensor = self.store.get_tensor(handle.blob)
            except BatonError as exc:
                raise exc.at(field=f"inputs[{n}]") from exc
            inputs.append(Latents(tensor, handle))
        results: list[Latents | None] = [None] * len(inputs)
        for i in [*range(1, len(inputs)), 0]:
            x = inputs[i]
            for call, kwargs in chains[i]:
                definition = REGISTRY[call.name]
                device = kwargs.pop("device") or self.device
                ctx = Context(device, kwargs.pop("model_offload"), self.convert, self.store, deadline)
                others = [r for j, r in enumerate(results) if j != i and r is not None][: definition.inputs - 1]
                if len(others) < definition.inputs - 1:
                    raise InvalidArgument(
                        f"{call.name} mixes {definition.inputs} inputs: put it in the first chain and give the stage "
                        "more latents, one '+'-separated chain each",
                        field="processors",
                    )
                try:
                    x = definition.fn(ctx, x, *others, **kwargs)
                except BatonError as exc:
                    raise exc.at(field="processors") from exc
                check_finite(
                    x.tensor,
                    f"the output of {call.name}",
                    "its arguments (a scale factor too large for the latents' dtype) or NaN/inf in its input",
                )
            results[i] = x
        outputs = []
        for i, result in enumerate(results):
            assert result is not None
            name = (req.output_key if i == 0 else f"{req.output_key}/{i}") if req.output_key else None
            handle = pb.LatentHandle()
            handle.CopyFrom(result.handle)
            handle.blob.CopyFrom(self.store.put_tensor(result.tensor.cpu().contiguous(), name=name))
            outputs.append(handle)
        return ppb.ProcessResponse(latents=outputs[0], outputs=outputs)
