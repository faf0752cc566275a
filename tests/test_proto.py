"""The committed Python stubs are what `make proto` generates from proto/."""

from __future__ import annotations

from services.common import protogen


def test_committed_stubs_match_the_protos(tmp_path):
    generated = {p.relative_to(tmp_path): p.read_text() for p in protogen.generate(tmp_path)}
    committed = {
        p.relative_to(protogen.API_DIR): p.read_text()
        for p in protogen.API_DIR.rglob("*")
        if p.suffix in (".py", ".pyi")
    }
    stale = sorted(str(k) for k in generated.keys() | committed.keys() if generated.get(k) != committed.get(k))
    assert not stale, f"stubs are stale, run `make proto`: {stale}"


def test_every_service_of_the_v1_api_is_defined():
    from services.common.api.baton.v1 import denoiser_pb2, gateway_pb2, interposer_pb2, processor_pb2

    methods = {
        name: [m.name for m in mod.DESCRIPTOR.services_by_name[name].methods]
        for name, mod in [
            ("Denoiser", denoiser_pb2),
            ("Interposer", interposer_pb2),
            ("Processor", processor_pb2),
            ("Gateway", gateway_pb2),
        ]
    }
    assert methods == {
        "Denoiser": [
            "Denoise",
            "Encode",
            "Decode",
            "ListModels",
            "InspectModel",
            "LoadModel",
            "UnloadModel",
            "InspectAdapter",
        ],
        "Interposer": ["Convert", "ListConversions"],
        "Processor": ["Process", "ListProcessors"],
        "Gateway": [
            *("Submit", "Run", "Watch", "Get", "Cancel", "List", "PutBlob", "GetBlob", "ListSchedulers"),
            *("ListModels", "ListProcessors", "ListWorkers"),
        ],
    }
    assert denoiser_pb2.DESCRIPTOR.services_by_name["Denoiser"].methods_by_name["Denoise"].server_streaming


def test_design_sketch_parses_as_a_job_spec():
    """The public field names of DESIGN.md's job spec sketch are JobSpec's JSON mapping."""
    import yaml
    from google.protobuf import json_format

    from services.common.api.baton.v1 import jobs_pb2

    sketch = """
name: two-model-coop
seed: 42
width: 512
height: 512
stages:
  - name: draft
    denoise: {model: m1, prompt: a landscape, negative_prompt: blurry, steps: 30, guidance_scale: 7.5,
              scheduler: EulerDiscreteScheduler, denoising_end: 0.8}
  - name: finish
    denoise: {model: m2, latents: draft, denoising_start: 0.8, steps: 30}
  - name: to_xl
    interpose: {latents: finish, target: sdxl}
  - name: prep
    process: {latents: to_xl, processors: ["scale;factor=1.05;normalize=true"]}
  - name: picture
    decode: {latents: finish}
outputs:
  - {stage: finish, format: safetensors}
  - {stage: picture, format: png}
"""
    spec = json_format.ParseDict(yaml.safe_load(sketch), jobs_pb2.JobSpec())
    assert spec.stages[1].denoise.denoising_start == 0.8
    assert spec.stages[0].denoise.HasField("denoising_end") and not spec.stages[0].denoise.HasField("denoising_start")
    assert spec.stages[3].process.processors == ["scale;factor=1.05;normalize=true"]
    assert [o.format for o in spec.outputs] == ["safetensors", "png"]
