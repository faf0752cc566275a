"""The planner: a JobSpec in, a checked DAG of stages out, before any GPU work.

Every rejection is an InvalidArgument naming the stage and the field, and saying what would
be accepted. The denoiser re-checks what concerns it; this is the first line of defence.
A stage kind that no worker serves right now is Unavailable, not the spec's fault: the same
spec runs once workers of that kind are up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from services.common.api.baton.v1 import denoiser_pb2 as dpb
from services.common.api.baton.v1 import jobs_pb2 as jpb
from services.common.api.baton.v1 import processor_pb2 as ppb
from services.common.api.baton.v1.interposer_pb2 import CONVERSION_METHOD_VAE
from services.common.errors import BatonError, InvalidArgument, Unavailable
from services.common.job_files import OUTPUT_FORMATS
from services.common.latent_spaces import SPACES
from services.common.processor_uri import check_chains
from services.common.scheduler_caps import NEVER, capabilities

LATENTS, IMAGE = "latents", "image"
# Images one denoise stage may draw; larger batches are several jobs.
MAX_BATCH = 64
KINDS = ("denoise", "interpose", "process", "decode", "encode")
# Which kind of worker runs each stage kind.
WORKER_FOR = {"denoise": "denoiser", "decode": "denoiser", "encode": "denoiser", "interpose": "interposer",
              "process": "processor"}  # fmt: skip


@dataclass
class Product:
    """What a stage (or input) hands on."""

    kind: str
    space: str = ""
    # Fraction of the schedule done (1.0 = finished); None when unknown.
    level: float | None = 1.0
    model: str = ""
    scheduler: str = ""
    width: int = 0
    height: int = 0
    # Latents (or images) in the batch; 0 when unknown.
    batch: int = 0


@dataclass
class PlannedStage:
    name: str
    kind: str
    spec: jpb.StageSpec
    deps: list[str] = field(default_factory=list)
    product: Product = field(default_factory=lambda: Product(LATENTS))
    model: dpb.ModelInfo | None = None


@dataclass
class Plan:
    spec: jpb.JobSpec
    order: list[str]
    stages: dict[str, PlannedStage]
    inputs: dict[str, Product]

    def models(self) -> set[str]:
        return {s.model.name for s in self.stages.values() if s.model is not None}


def stage_kind(stage: jpb.StageSpec) -> str:
    return stage.WhichOneof("kind") or ""


def referenced_models(spec: jpb.JobSpec) -> set[str]:
    """Model names a spec names: its stages', and those of latents inputs (decode may inherit them)."""
    names = {i.latents.model for i in spec.inputs if i.WhichOneof("source") == "latents" and i.latents.model}
    for stage in spec.stages:
        kind = stage_kind(stage)
        if kind in ("denoise", "decode", "encode") and getattr(stage, kind).model:
            names.add(getattr(stage, kind).model)
    return names


def uses_processors(spec: jpb.JobSpec) -> bool:
    for stage in spec.stages:
        kind = stage_kind(stage)
        if kind == "process" or (kind == "denoise" and (stage.denoise.latents_processors or
                                                        stage.denoise.output_processors)):  # fmt: skip
            return True
    return False


def ready_stages(spec: jpb.JobSpec, done: set[str]) -> list[tuple[str, str]]:
    """(worker kind, model) of each stage not in `done` whose inputs are all ready: what a job needs next."""
    names = {s.name for s in spec.stages}
    out = []
    for stage in spec.stages:
        kind = stage_kind(stage)
        if stage.name in done or kind not in WORKER_FOR:
            continue
        if {ref for _, ref, _ in _refs(stage) if ref in names} <= done:
            out.append((WORKER_FOR[kind], getattr(getattr(stage, kind), "model", "")))
    return out


def _refs(stage: jpb.StageSpec) -> list[tuple[str, str, str]]:
    """(field, referenced name, wanted product) for each input of a stage."""
    kind = stage_kind(stage)
    body = getattr(stage, kind)
    if kind == "denoise":
        pairs = [("latents", LATENTS), ("image", IMAGE), ("mask", IMAGE)]
        return [(f"denoise.{f}", getattr(body, f), want) for f, want in pairs if getattr(body, f)]
    if kind == "encode":
        return [("encode.image", body.image, IMAGE)]
    refs = [(f"{kind}.latents", body.latents, LATENTS)]
    if kind == "process":
        refs += [(f"process.more_latents[{i}]", name, LATENTS) for i, name in enumerate(body.more_latents)]
    return refs


class Planner:
    """Checks a spec against the models and worker kinds there are."""

    def __init__(
        self,
        models: dict[str, dpb.ModelInfo | BatonError],
        worker_kinds: set[str],
        processors: dict[str, ppb.ProcessorInfo] | None = None,
    ):
        self.models = models
        self.worker_kinds = worker_kinds
        self.processors = processors or {}

    def plan(self, spec: jpb.JobSpec) -> Plan:
        inputs = {i.name: self._input(n, i) for n, i in enumerate(spec.inputs)}
        stages: dict[str, PlannedStage] = {}
        for n, stage in enumerate(spec.stages):
            self._check_name(stage.name, stage.name, f"stages[{n}].name", set(stages) | set(inputs))
            kind = stage_kind(stage)
            if kind not in KINDS:
                raise InvalidArgument(f"a stage needs one of: {', '.join(KINDS)}", stage=stage.name, field="kind")
            if WORKER_FOR[kind] not in self.worker_kinds:
                raise Unavailable(
                    f"no {WORKER_FOR[kind]} worker is registered to run {kind} stages; try again once one is up",
                    stage=stage.name,
                    field=kind,
                )
            stages[stage.name] = PlannedStage(stage.name, kind, stage)
        for planned in stages.values():
            for fld, ref, _ in _refs(planned.spec):
                if ref == planned.name or (ref not in stages and ref not in inputs):
                    known = ", ".join(sorted(set(stages) | set(inputs) - {planned.name})) or "none"
                    raise InvalidArgument(
                        f"{ref!r} is not another stage or an input; known: {known}", stage=planned.name, field=fld
                    )
                if ref in stages:
                    planned.deps.append(ref)
        order = _topological(stages)
        products = dict(inputs)
        for name in order:
            planned = stages[name]
            for fld, ref, want in _refs(planned.spec):
                if products[ref].kind != want:
                    raise InvalidArgument(
                        f"{ref!r} gives {products[ref].kind}, this field takes {want}", stage=name, field=fld
                    )
            planned.product = getattr(self, f"_{planned.kind}")(spec, planned, products)
            products[name] = planned.product
        for n, out in enumerate(spec.outputs):
            self._output(n, out, products, stages)
        if not spec.stages:
            raise InvalidArgument("a job needs at least one stage", field="stages")
        return Plan(spec, order, stages, inputs)

    # -- checks shared by stage kinds ------------------------------------------------------
    @staticmethod
    def _check_name(name: str, stage: str, fld: str, taken: set[str]) -> None:
        if not name or any(c in name for c in "{}/"):
            raise InvalidArgument(
                f"names must be non-empty, without braces or slashes: {name!r}", stage=stage, field=fld
            )
        if name in taken:
            raise InvalidArgument(f"the name {name!r} is used twice; names must be unique", stage=stage, field=fld)

    def _model(self, name: str, stage: str, fld: str) -> dpb.ModelInfo:
        found = self.models.get(name)
        if found is None:
            raise InvalidArgument("a model is required", stage=stage, field=fld)
        if isinstance(found, BatonError):
            raise InvalidArgument(found.detail, stage=stage, field=fld)
        return found

    @staticmethod
    def _size(value: int, model: dpb.ModelInfo, stage: str, fld: str) -> None:
        multiple = max(model.size_multiple, 1)
        if value < multiple or value % multiple:
            raise InvalidArgument(
                f"{value} is not a positive multiple of {multiple}, which {model.name} needs", stage=stage, field=fld
            )

    @staticmethod
    def _space(got: Product, ref: str, model: dpb.ModelInfo, stage: str, fld: str) -> None:
        if got.space and got.space != model.space:
            raise InvalidArgument(
                f"latents from {ref!r} are in the {got.space!r} latent space but {model.name} works in "
                f"{model.space!r}; add an interpose stage (target: {model.space}) between them",
                stage=stage,
                field=fld,
            )

    # -- stage kinds -----------------------------------------------------------------------
    def _denoise(self, spec: jpb.JobSpec, planned: PlannedStage, products: dict[str, Product]) -> Product:
        body, name = planned.spec.denoise, planned.name
        model = planned.model = self._model(body.model, name, "denoise.model")
        if body.steps <= 0:
            raise InvalidArgument(
                f"steps must be a positive number, got {body.steps}", stage=name, field="denoise.steps"
            )
        start = body.denoising_start if body.HasField("denoising_start") else None
        end = body.denoising_end if body.HasField("denoising_end") else 1.0
        for fld, value in (("denoise.denoising_start", start), ("denoise.denoising_end", end)):
            if value is not None and not 0.0 <= value <= 1.0:
                raise InvalidArgument(f"must be in [0, 1], got {value}", stage=name, field=fld)
        if start is not None and start >= end:
            raise InvalidArgument(f"denoising_start {start} must be below denoising_end {end}", stage=name,
                                  field="denoise.denoising_start")  # fmt: skip
        if body.HasField("strength") and not 0 < body.strength <= 1:
            raise InvalidArgument(
                f"strength must be in (0, 1], got {body.strength}", stage=name, field="denoise.strength"
            )
        if body.mask and not body.image:
            raise InvalidArgument("inpainting needs the image the mask applies to", stage=name, field="denoise.image")
        if not 0 <= body.num_images <= MAX_BATCH:
            raise InvalidArgument(f"must be in 0..{MAX_BATCH} (0 = 1), got {body.num_images}", stage=name,
                                  field="denoise.num_images")  # fmt: skip
        batch = self._batch(body, products, name)
        if (body.latents_processors or body.output_processors) and "processor" not in self.worker_kinds:
            raise Unavailable("no processor worker is registered to run latents processors; try again once one "
                              "is up", stage=name, field="denoise.latents_processors")  # fmt: skip
        for fld in ("latents_processors", "output_processors"):
            if getattr(body, fld):
                self._chains(list(getattr(body, fld)), 1, name, f"denoise.{fld}")
        width = body.width or spec.width or model.default_width
        height = body.height or spec.height or model.default_height
        scheduler = body.scheduler or model.default_scheduler
        incoming = products.get(body.latents) if body.latents else None
        if incoming is not None:
            self._space(incoming, body.latents, model, name, "denoise.latents")
            self._join(incoming, body.latents, start, name)
            if incoming.level is not None and 0 < incoming.level < 1:
                start = incoming.level
                if not body.scheduler and incoming.model == body.model and incoming.scheduler:
                    scheduler = incoming.scheduler
            if incoming.width and incoming.height:
                for fld, mine, theirs in (
                    ("width", body.width, incoming.width),
                    ("height", body.height, incoming.height),
                ):
                    if mine and mine != theirs:
                        raise InvalidArgument(f"{mine} differs from the {theirs} of {body.latents!r}'s latents",
                                              stage=name, field=f"denoise.{fld}")  # fmt: skip
                width, height = incoming.width, incoming.height
        elif start:
            raise InvalidArgument(
                f"a window starting at {start} continues latents: name the stage that ran up to {start} in "
                "denoise.latents",
                stage=name,
                field="denoise.latents",
            )
        self._size(width, model, name, "denoise.width")
        self._size(height, model, name, "denoise.height")
        partial = bool(start) or end < 1.0
        caps = capabilities(scheduler, {})
        if partial and caps.split == NEVER:
            raise InvalidArgument(caps.why, stage=name, field="denoise.scheduler")
        return Product(LATENTS, model.space, end if end < 1 else 1.0, body.model, scheduler, width, height, batch)

    @staticmethod
    def _batch(body: jpb.DenoiseStage, products: dict[str, Product], stage: str) -> int:
        """A denoise stage's batch: its latents', else num_images. An image input is one image."""
        image = products.get(body.image) if body.image else None
        if image is not None and image.batch > 1:
            raise InvalidArgument(
                f"{body.image!r} holds {image.batch} images; img2img takes one: encode them (an encode stage) and "
                "start from those latents",
                stage=stage,
                field="denoise.image",
            )
        incoming = products.get(body.latents) if body.latents else None
        if incoming is None or not incoming.batch:
            return max(body.num_images, 1) if incoming is None else 0
        if body.num_images and body.num_images != incoming.batch:
            raise InvalidArgument(
                f"num_images is {body.num_images} but {body.latents!r} hands on a batch of {incoming.batch}; "
                "continued latents keep their batch size",
                stage=stage,
                field="denoise.num_images",
            )
        return incoming.batch

    @staticmethod
    def _join(incoming: Product, ref: str, start: float | None, stage: str) -> None:
        """A consumer's window must begin where its producer's ended."""
        if start is None or incoming.level is None:
            return
        if incoming.level >= 1.0:
            raise InvalidArgument(
                f"{ref!r} hands on finished latents; denoising_start continues partly denoised ones. Use strength "
                "for img2img instead",
                stage=stage,
                field="denoise.denoising_start",
            )
        if not math.isclose(start, incoming.level, abs_tol=1e-6):
            raise InvalidArgument(
                f"the window starts at {start} but {ref!r} stops at {incoming.level}; set denoising_start to "
                f"{incoming.level} or leave it unset to continue from there",
                stage=stage,
                field="denoise.denoising_start",
            )

    def _interpose(self, spec, planned: PlannedStage, products: dict[str, Product]) -> Product:
        body, name = planned.spec.interpose, planned.name
        incoming = products[body.latents]
        if body.target not in SPACES:
            raise InvalidArgument(f"unknown latent space {body.target!r}; known: {', '.join(SPACES)}", stage=name,
                                  field="interpose.target")  # fmt: skip
        if incoming.level is not None and incoming.level < 1.0:
            raise InvalidArgument(
                f"the interposer converts finished latents only; {body.latents!r} stops at {incoming.level}. "
                "Convert after the last window of that space",
                stage=name,
                field="interpose.latents",
            )
        if body.method == CONVERSION_METHOD_VAE and not body.target_model:
            raise InvalidArgument(f"the VAE round trip encodes with a target model's VAE: name a {body.target} model",
                                  stage=name, field="interpose.target_model")  # fmt: skip
        return Product(LATENTS, body.target, 1.0, body.target_model, "", incoming.width, incoming.height,
                       incoming.batch)  # fmt: skip

    def _process(self, spec, planned: PlannedStage, products: dict[str, Product]) -> Product:
        body, name = planned.spec.process, planned.name
        if not body.processors:
            raise InvalidArgument("name at least one processor URI", stage=name, field="process.processors")
        chains = self._chains(list(body.processors), 1 + len(body.more_latents), name, "process.processors")
        incoming = products[body.latents]
        product = Product(LATENTS, incoming.space, incoming.level, incoming.model, incoming.scheduler, incoming.width,
                          incoming.height, incoming.batch)  # fmt: skip
        for call, args in chains[0]:
            if call.name == "noise":  # the new level depends on the latents' schedule; the denoiser checks it
                product.level = None
            elif call.name == "interposer":
                product.space, product.model = args["target"], args.get("target_model") or ""
            elif call.name in ("resize", "crop"):
                product.width = product.height = 0
        return product

    def _chains(self, items: list[str], inputs: int, stage: str, fld: str):
        try:
            return check_chains(items, inputs, self.processors)
        except InvalidArgument as exc:
            raise InvalidArgument(exc.detail, stage=stage, field=fld) from exc

    def _decode(self, spec, planned: PlannedStage, products: dict[str, Product]) -> Product:
        body, name = planned.spec.decode, planned.name
        incoming = products[body.latents]
        model_name = body.model or incoming.model
        if not model_name:
            raise InvalidArgument(f"{body.latents!r} names no model; say whose VAE decodes", stage=name,
                                  field="decode.model")  # fmt: skip
        model = planned.model = self._model(model_name, name, "decode.model")
        self._space(incoming, body.latents, model, name, "decode.latents")
        return Product(IMAGE, width=incoming.width, height=incoming.height, batch=incoming.batch)

    def _encode(self, spec, planned: PlannedStage, products: dict[str, Product]) -> Product:
        body, name = planned.spec.encode, planned.name
        model = planned.model = self._model(body.model, name, "encode.model")
        return Product(LATENTS, model.space, 1.0, body.model, "", 0, 0, products[body.image].batch)

    # -- inputs and outputs ----------------------------------------------------------------
    def _input(self, n: int, spec: jpb.InputSpec) -> Product:
        self._check_name(spec.name, "", f"inputs[{n}].name", set())
        source = spec.WhichOneof("source")
        if source == "path":
            raise InvalidArgument(
                f"{spec.path!r} is a file on the client: upload it with PutBlob and pass the handle "
                "(baton run does this)",
                field=f"inputs[{n}].path",
            )
        if source == "latents":
            handle = spec.latents
            level = handle.noise.fraction if handle.HasField("noise") else 1.0
            shape = handle.blob.shape
            return Product(LATENTS, handle.space, level, handle.model, handle.scheduler.class_name, handle.width,
                           handle.height, shape[0] if len(shape) == 4 else 1 if len(shape) == 3 else 0)  # fmt: skip
        if source == "blob":
            if spec.blob.media_type.startswith("image/"):
                return Product(IMAGE, batch=1)
            raise InvalidArgument(
                f"blob inputs are images; this one is {spec.blob.media_type!r}", field=f"inputs[{n}].blob"
            )
        raise InvalidArgument("an input needs a path, blob or latents", field=f"inputs[{n}]")

    @staticmethod
    def _output(n: int, out: jpb.OutputSpec, products: dict[str, Product], stages: dict[str, PlannedStage]) -> None:
        if out.stage not in stages:
            raise InvalidArgument(
                f"{out.stage!r} is not a stage; stages: {', '.join(stages)}", field=f"outputs[{n}].stage"
            )
        fmt = out.format.lower()
        if fmt not in OUTPUT_FORMATS:
            raise InvalidArgument(f"unknown format {out.format!r}; accepted: {', '.join(OUTPUT_FORMATS)}",
                                  stage=out.stage, field=f"outputs[{n}].format")  # fmt: skip
        made = products[out.stage].kind
        if OUTPUT_FORMATS[fmt] != made:
            fits = ", ".join(f for f, k in OUTPUT_FORMATS.items() if k == made)
            hint = "; add a decode stage for pictures" if made == LATENTS else ""
            raise InvalidArgument(f"the stage gives {made}: use {fits}{hint}", stage=out.stage,
                                  field=f"outputs[{n}].format")  # fmt: skip


def _topological(stages: dict[str, PlannedStage]) -> list[str]:
    """Stage names with every stage after the stages it consumes; a cycle is an error."""
    pending = {name: set(s.deps) for name, s in stages.items()}
    order: list[str] = []
    while pending:
        ready = [name for name, deps in pending.items() if not deps]
        if not ready:
            cycle = ", ".join(sorted(pending))
            raise InvalidArgument(f"stages consume each other in a cycle: {cycle}", stage=sorted(pending)[0],
                                  field="latents")  # fmt: skip
        for name in ready:
            order.append(name)
            del pending[name]
        for deps in pending.values():
            deps.difference_update(ready)
    return order
