"""The planner: a JobSpec in, a checked DAG of stages out, before any GPU work.

Every rejection is an InvalidArgument naming the stage and the field, and saying what would
be accepted. The denoiser re-checks what concerns it; this is the first line of defence.
A stage kind that no worker serves right now is Unavailable, not the spec's fault: the same
spec runs once workers of that kind are up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from services.common.api.baton.v1 import adapters_pb2 as apb
from services.common.api.baton.v1 import denoiser_pb2 as dpb
from services.common.api.baton.v1 import handles_pb2 as pb
from services.common.api.baton.v1 import interposer_pb2 as ipb
from services.common.api.baton.v1 import jobs_pb2 as jpb
from services.common.api.baton.v1 import processor_pb2 as ppb
from services.common.api.baton.v1.interposer_pb2 import CONVERSION_METHOD_VAE
from services.common.errors import BatonError, InvalidArgument, Unavailable
from services.common.family_defaults import CONTINUE, DEFAULTS, FROM_NOISE, IMG2IMG, INPAINT, TXT2IMG
from services.common.job_files import OUTPUT_FORMATS
from services.common.latent_spaces import SPACES
from services.common.limits import DEFAULT, Limits
from services.common.processor_uri import check_chains
from services.common.rules import denoise as rules
from services.common.rules import located
from services.common.rules.blobs import check_image_pixels, check_latents_blob, check_tensor_header
from services.common.rules.scheduler import check_scheduler, check_solver_history

LATENTS, IMAGE = "latents", "image"
KINDS = ("denoise", "interpose", "process", "decode", "encode")
# Which kind of worker runs each stage kind.
WORKER_FOR = {
    "denoise": "denoiser",
    "decode": "denoiser",
    "encode": "denoiser",
    "interpose": "interposer",
    "process": "processor",
}


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
    # The schedule's steps, and whether partly denoised latents carry their multistep scheduler's
    # state (a stage's own output does; a file input may not).
    steps: int = 0
    has_state: bool = True
    # The latents were drawn from seeds their stage (or file) chose, which a continuation keeps.
    seeded: bool = False


@dataclass
class PlannedStage:
    name: str
    kind: str
    spec: jpb.StageSpec
    deps: list[str] = field(default_factory=list)
    product: Product = field(default_factory=lambda: Product(LATENTS))
    model: dpb.ModelInfo | None = None
    # What the stage's worker is sent, every default resolved; the stage fills in input handles
    # and the output key.
    request: Message | None = None


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


def adapter_requests(body: jpb.DenoiseStage) -> list[apb.InspectAdapterRequest]:
    """What to ask a denoiser about the stage's adapters: its LoRAs, then its embeddings."""
    out = [apb.InspectAdapterRequest(model=body.model, lora=lora) for lora in body.loras]
    out += [apb.InspectAdapterRequest(model=body.model, textual_inversion=t) for t in body.textual_inversions]
    return out


def referenced_adapters(spec: jpb.JobSpec) -> list[apb.InspectAdapterRequest]:
    """Every adapter the spec's denoise stages name, with their models."""
    return [r for stage in spec.stages if stage_kind(stage) == "denoise" for r in adapter_requests(stage.denoise)]


def uses_processors(spec: jpb.JobSpec) -> bool:
    for stage in spec.stages:
        kind = stage_kind(stage)
        if kind == "process" or (
            kind == "denoise" and (stage.denoise.latents_processors or stage.denoise.output_processors)
        ):
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
        limits: Limits = DEFAULT,
        stored: dict[str, pb.BlobHandle] | None = None,
        adapters: dict[bytes, apb.AdapterInfo | BatonError] | None = None,
    ):
        self.models = models
        self.worker_kinds = worker_kinds
        self.processors = processors or {}
        self.limits = limits
        # The manifests Redis holds for the inputs' blobs, by key: what was really uploaded.
        self.stored = stored or {}
        # What a denoiser found about each adapter the stages name (adapter_request's key).
        self.adapters = adapters or {}

    def plan(self, spec: jpb.JobSpec) -> Plan:
        if not 0 <= spec.timeout_s <= self.limits.max_job_timeout:  # NaN fails this too
            raise InvalidArgument(
                f"timeout_s must be 0 (the gateway's default) or a number of seconds up to "
                f"{self.limits.max_job_timeout:g}, got {spec.timeout_s}",
                field="timeout_s",
            )
        rules.check_seeds(spec.seeds, spec.seed if spec.HasField("seed") else None, 0, self.limits)
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
            raise found.at(stage=stage, field=fld)
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
        defaults = DEFAULTS.get(model.family)
        limits = self.limits
        if (body.latents_processors or body.output_processors) and "processor" not in self.worker_kinds:
            raise Unavailable(
                "no processor worker is registered to run latents processors; try again once one is up",
                stage=name,
                field="denoise.latents_processors",
            )
        for fld in ("latents_processors", "output_processors"):
            if getattr(body, fld):
                self._chains(list(getattr(body, fld)), 1, name, f"denoise.{fld}")
        incoming = products.get(body.latents) if body.latents else None
        image = products.get(body.image) if body.image else None
        with located(stage=name, prefix="denoise."):
            start, end = _optional(body, "denoising_start"), _optional(body, "denoising_end")
            strength, guidance = _optional(body, "strength"), _optional(body, "guidance_scale")
            rules.check_steps(body.steps, limits)
            rules.check_window(start, end)
            rules.check_strength(strength)
            rules.check_guidance(guidance, body.guidance_rescale, limits)
            rules.check_text({f: getattr(body, f) for f in rules.PROMPTS}, body.max_sequence_length, limits)
            rules.check_preview_every(body.preview_every)
            rules.check_num_images(body.num_images, limits)
            own_seed = body.HasField("seed") or bool(body.seeds)
            seeds = list(body.seeds) if own_seed else list(spec.seeds)  # a stage without its own takes the job's
            rules.check_seeds(seeds, body.seed if body.HasField("seed") else None, body.num_images, limits)
            rules.check_adapters(body)
            rules.check_sources(incoming is not None, image is not None, bool(body.mask), start)
            if image is not None and image.batch > 1:
                raise InvalidArgument(
                    f"{body.image!r} holds {image.batch} images; img2img takes one: encode them (an encode stage) "
                    "and start from those latents",
                    field="image",
                )
            unknown_batch = incoming is not None and not incoming.batch
            incoming_batch = incoming.batch if incoming else 0
            batch = 0 if unknown_batch else rules.check_batch(body.num_images, incoming_batch, len(seeds))
            level = incoming.level if incoming is not None else None
            mode = _mode(incoming is not None, level, image is not None, bool(body.mask))
            if incoming is not None:
                self._space(incoming, body.latents, model, name, "latents")  # located adds "denoise."
            start = rules.window_start(start, level, image is not None)
            scheduler = body.scheduler or model.default_scheduler
            if incoming is not None and incoming.model == body.model and incoming.scheduler and not body.scheduler:
                scheduler = incoming.scheduler  # the same model continuing its own schedule keeps it
            config = MessageToDict(body.scheduler_config) if body.HasField("scheduler_config") else {}
            caps = check_scheduler(scheduler, config, bool(start) or (end is not None and end < 1.0))
            if (
                mode == CONTINUE
                and incoming is not None
                and incoming.model in ("", body.model)  # "": another tool's file, its scheduler declared
                and (incoming.scheduler, incoming.steps) == (scheduler, body.steps)
                and not config
            ):
                check_solver_history(caps, incoming.has_state, body.restart_solver_history)
            width, height = body.width or spec.width, body.height or spec.height
            if incoming is not None and incoming.width and incoming.height:
                rules.check_same_size(body.width, body.height, incoming.width, incoming.height)
                width, height = incoming.width, incoming.height
            elif incoming is None and image is None:
                width, height = width or model.default_width, height or model.default_height
            if width and height:
                rules.check_size(width, height, max(model.size_multiple, 1), limits)
                if batch:
                    rules.check_latent_elements(
                        batch, model.latent_channels, width, height, model.vae_scale_factor, limits
                    )
            if mode in (IMG2IMG, INPAINT) and defaults is not None:
                strength = defaults.strength_for(mode) if strength is None else strength
                rules.check_runs_a_step(body.steps, strength, defaults.flow)
            if guidance is None and defaults is not None and mode is not None:
                guidance = defaults.guidance_for(mode)
        for i, request in enumerate(adapter_requests(body)):
            found = self.adapters.get(request.SerializeToString(deterministic=True))
            fld = f"denoise.loras[{i}]" if i < len(body.loras) else f"denoise.textual_inversions[{i - len(body.loras)}]"
            if isinstance(found, BatonError):
                raise found.at(stage=name, field=f"{fld}.{found.field}" if found.field else fld)
        seed = body.seed if body.HasField("seed") else spec.seed if spec.HasField("seed") and not seeds else None
        keeps_seeds = mode == CONTINUE and incoming is not None and incoming.seeded
        if keeps_seeds and not own_seed:
            seed, seeds = None, []  # the denoiser keeps the seed of each continued image
        planned.request = _denoise_request(
            body,
            scheduler,
            start,
            strength,
            guidance,
            seed,
            0 if incoming is not None else width,
            0 if incoming is not None else height,
            batch if incoming is None else 0,
        )
        planned.request.seeds.extend(seeds)
        return Product(
            LATENTS,
            model.space,
            end if end is not None and end < 1 else 1.0,
            body.model,
            scheduler,
            width,
            height,
            batch,
            body.steps,
            seeded=own_seed or keeps_seeds,
        )

    def _interpose(self, spec, planned: PlannedStage, products: dict[str, Product]) -> Product:
        body, name = planned.spec.interpose, planned.name
        incoming = products[body.latents]
        if body.target not in SPACES:
            raise InvalidArgument(
                f"unknown latent space {body.target!r}; known: {', '.join(SPACES)}",
                stage=name,
                field="interpose.target",
            )
        if incoming.level is not None and incoming.level < 1.0:
            raise InvalidArgument(
                f"the interposer converts finished latents only; {body.latents!r} stops at {incoming.level}. "
                "Convert after the last window of that space",
                stage=name,
                field="interpose.latents",
            )
        if body.method == CONVERSION_METHOD_VAE and not body.target_model:
            raise InvalidArgument(
                f"the VAE round trip encodes with a target model's VAE: name a {body.target} model",
                stage=name,
                field="interpose.target_model",
            )
        planned.request = ipb.ConvertRequest(
            target=body.target, method=body.method, source_model=body.source_model, target_model=body.target_model
        )
        return Product(
            LATENTS, body.target, 1.0, body.target_model, "", incoming.width, incoming.height, incoming.batch
        )

    def _process(self, spec, planned: PlannedStage, products: dict[str, Product]) -> Product:
        body, name = planned.spec.process, planned.name
        if not body.processors:
            raise InvalidArgument("name at least one processor URI", stage=name, field="process.processors")
        chains = self._chains(list(body.processors), 1 + len(body.more_latents), name, "process.processors")
        incoming = products[body.latents]
        product = Product(
            LATENTS,
            incoming.space,
            incoming.level,
            incoming.model,
            incoming.scheduler,
            incoming.width,
            incoming.height,
            incoming.batch,
        )
        for call, args in chains[0]:
            if call.name == "noise":  # the new level depends on the latents' schedule; the denoiser checks it
                product.level = None
            elif call.name == "interposer":
                product.space, product.model = args["target"], args.get("target_model") or ""
            elif call.name in ("resize", "crop"):
                product.width = product.height = 0
        planned.request = ppb.ProcessRequest(processors=body.processors)
        return product

    def _chains(self, items: list[str], inputs: int, stage: str, fld: str):
        try:
            return check_chains(items, inputs, self.processors, self.limits)
        except InvalidArgument as exc:
            raise InvalidArgument(exc.detail, stage=stage, field=fld) from exc

    def _decode(self, spec, planned: PlannedStage, products: dict[str, Product]) -> Product:
        body, name = planned.spec.decode, planned.name
        incoming = products[body.latents]
        model_name = body.model or incoming.model
        if not model_name:
            raise InvalidArgument(
                f"{body.latents!r} names no model; say whose VAE decodes", stage=name, field="decode.model"
            )
        model = planned.model = self._model(model_name, name, "decode.model")
        self._space(incoming, body.latents, model, name, "decode.latents")
        planned.request = dpb.DecodeRequest(model=model_name)
        return Product(IMAGE, width=incoming.width, height=incoming.height, batch=incoming.batch)

    def _encode(self, spec, planned: PlannedStage, products: dict[str, Product]) -> Product:
        body, name = planned.spec.encode, planned.name
        model = planned.model = self._model(body.model, name, "encode.model")
        planned.request = dpb.EncodeRequest(model=body.model)
        if body.HasField("seed"):
            planned.request.seed = body.seed
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
            self._stored_latents(n, handle)
            level = handle.noise.fraction if handle.HasField("noise") else 1.0
            shape = handle.blob.shape
            return Product(
                LATENTS,
                handle.space,
                level,
                handle.model,
                handle.scheduler.class_name,
                handle.width,
                handle.height,
                shape[0] if len(shape) == 4 else 1 if len(shape) == 3 else 0,
                handle.scheduler.steps,
                bool(handle.scheduler.state.key),
                seeded=bool(handle.model) and bool(handle.seed or handle.seeds),
            )
        if source == "blob":
            if spec.blob.media_type.startswith("image/"):
                stored = self.stored.get(spec.blob.key)
                if stored is not None and len(stored.shape) == 3:  # [H, W, C], read from the header at upload
                    height, width = int(stored.shape[0]), int(stored.shape[1])
                    check_image_pixels(width, height, self.limits, f"inputs[{n}].blob")
                    return Product(IMAGE, width=width, height=height, batch=1)
                return Product(IMAGE, batch=1)
            raise InvalidArgument(
                f"blob inputs are images; this one is {spec.blob.media_type!r}", field=f"inputs[{n}].blob"
            )
        raise InvalidArgument("an input needs a path, blob or latents", field=f"inputs[{n}]")

    def _stored_latents(self, n: int, handle: pb.LatentHandle) -> None:
        """A latents input is what its blob holds: float [C, H, W] or [B, C, H, W], in a known space,
        and the handle must not disagree with what was stored."""
        fld = f"inputs[{n}].latents"
        if handle.space and handle.space not in SPACES:
            raise InvalidArgument(
                f"unknown latent space {handle.space!r}; known: {', '.join(SPACES)}", field=f"{fld}.space"
            )
        blob = self.stored.get(handle.blob.key) or handle.blob
        try:
            check_tensor_header(blob.media_type, blob.dtype, list(blob.shape), blob.byte_size)
        except InvalidArgument as exc:  # a handle whose shape does not fit the bytes it names
            raise InvalidArgument(exc.detail, field=f"{fld}.blob.{exc.field.removeprefix('header.')}") from exc
        check_latents_blob(blob.dtype, list(blob.shape), f"{fld}.blob")

    @staticmethod
    def _output(n: int, out: jpb.OutputSpec, products: dict[str, Product], stages: dict[str, PlannedStage]) -> None:
        if out.stage not in stages:
            raise InvalidArgument(
                f"{out.stage!r} is not a stage; stages: {', '.join(stages)}", field=f"outputs[{n}].stage"
            )
        fmt = out.format.lower()
        if fmt not in OUTPUT_FORMATS:
            raise InvalidArgument(
                f"unknown format {out.format!r}; accepted: {', '.join(OUTPUT_FORMATS)}",
                stage=out.stage,
                field=f"outputs[{n}].format",
            )
        made = products[out.stage].kind
        if OUTPUT_FORMATS[fmt] != made:
            fits = ", ".join(f for f, k in OUTPUT_FORMATS.items() if k == made)
            hint = "; add a decode stage for pictures" if made == LATENTS else ""
            raise InvalidArgument(
                f"the stage gives {made}: use {fits}{hint}", stage=out.stage, field=f"outputs[{n}].format"
            )


def _optional(message, fld: str):
    return getattr(message, fld) if message.HasField(fld) else None


def _mode(has_latents: bool, level: float | None, has_image: bool, has_mask: bool) -> str | None:
    """What a window does with what it starts from; None when the latents' level is unknown until they exist."""
    if has_mask:
        return INPAINT
    if has_image:
        return IMG2IMG
    if not has_latents:
        return TXT2IMG
    if level is None:
        return None
    return IMG2IMG if level >= 1.0 else CONTINUE if level > 0.0 else FROM_NOISE


def _denoise_request(
    body: jpb.DenoiseStage,
    scheduler: str,
    start: float | None,
    strength: float | None,
    guidance: float | None,
    seed: int | None,
    width: int,
    height: int,
    num_images: int,
) -> dpb.DenoiseRequest:
    """The worker's request with every default the gateway can know resolved; the stage adds its
    input handles and output key."""
    request = dpb.DenoiseRequest(
        model=body.model,
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        prompt_2=body.prompt_2,
        negative_prompt_2=body.negative_prompt_2,
        prompt_3=body.prompt_3,
        negative_prompt_3=body.negative_prompt_3,
        steps=body.steps,
        scheduler=scheduler,
        max_sequence_length=body.max_sequence_length,
        guidance_rescale=body.guidance_rescale,
        preview_every=body.preview_every,
        num_images=num_images,
        restart_solver_history=body.restart_solver_history,
        width=width,
        height=height,
    )
    if body.HasField("scheduler_config"):
        request.scheduler_config.CopyFrom(body.scheduler_config)
    request.loras.extend(body.loras)
    request.textual_inversions.extend(body.textual_inversions)
    if body.HasField("denoising_end"):
        request.denoising_end = body.denoising_end
    for fld, value in (
        ("denoising_start", start),
        ("strength", strength),
        ("guidance_scale", guidance),
        ("seed", seed),
    ):
        if value is not None:
            setattr(request, fld, value)
    return request


def _topological(stages: dict[str, PlannedStage]) -> list[str]:
    """Stage names with every stage after the stages it consumes; a cycle is an error."""
    pending = {name: set(s.deps) for name, s in stages.items()}
    order: list[str] = []
    while pending:
        ready = [name for name, deps in pending.items() if not deps]
        if not ready:
            cycle = ", ".join(sorted(pending))
            raise InvalidArgument(
                f"stages consume each other in a cycle: {cycle}", stage=sorted(pending)[0], field="latents"
            )
        for name in ready:
            order.append(name)
            del pending[name]
        for deps in pending.values():
            deps.difference_update(ready)
    return order
