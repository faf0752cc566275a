"""The options (scheduler_config keys) each scheduler Baton supports takes: plain data for the gateway.

They are the keyword arguments of the diffusers class's __init__ (what from_config accepts), copied
here so the gateway can refuse a misspelt option at Submit without importing diffusers;
tests/test_scheduler_rules.py checks this table against the installed diffusers, so it cannot drift.
"""

from __future__ import annotations

_BETAS = "num_train_timesteps beta_start beta_end beta_schedule trained_betas"
_OPTIONS = {
    "DDIMScheduler": _BETAS
    + (
        " clip_sample set_alpha_to_one steps_offset prediction_type thresholding "
        "dynamic_thresholding_ratio clip_sample_range sample_max_value timestep_spacing "
        "rescale_betas_zero_snr"
    ),
    "DDPMScheduler": _BETAS
    + (
        " variance_type clip_sample prediction_type thresholding dynamic_thresholding_ratio "
        "clip_sample_range sample_max_value timestep_spacing steps_offset rescale_betas_zero_snr"
    ),
    "DEISMultistepScheduler": _BETAS
    + (
        " solver_order prediction_type thresholding dynamic_thresholding_ratio sample_max_value "
        "algorithm_type solver_type lower_order_final use_karras_sigmas use_exponential_sigmas "
        "use_beta_sigmas use_flow_sigmas flow_shift timestep_spacing steps_offset use_dynamic_shifting "
        "time_shift_type"
    ),
    "DPMSolverMultistepScheduler": _BETAS
    + (
        " solver_order prediction_type thresholding dynamic_thresholding_ratio sample_max_value "
        "algorithm_type solver_type lower_order_final euler_at_final use_karras_sigmas "
        "use_exponential_sigmas use_beta_sigmas use_lu_lambdas use_flow_sigmas flow_shift "
        "final_sigmas_type lambda_min_clipped variance_type timestep_spacing steps_offset "
        "rescale_betas_zero_snr use_dynamic_shifting time_shift_type"
    ),
    "DPMSolverSDEScheduler": _BETAS
    + (
        " prediction_type use_karras_sigmas use_exponential_sigmas use_beta_sigmas noise_sampler_seed "
        "timestep_spacing steps_offset"
    ),
    "DPMSolverSinglestepScheduler": _BETAS
    + (
        " solver_order prediction_type thresholding dynamic_thresholding_ratio sample_max_value "
        "algorithm_type solver_type lower_order_final use_karras_sigmas use_exponential_sigmas "
        "use_beta_sigmas use_flow_sigmas flow_shift final_sigmas_type lambda_min_clipped variance_type "
        "use_dynamic_shifting time_shift_type"
    ),
    "EDMEulerScheduler": (
        "sigma_min sigma_max sigma_data sigma_schedule num_train_timesteps prediction_type rho final_sigmas_type"
    ),
    "EulerAncestralDiscreteScheduler": _BETAS + " prediction_type timestep_spacing steps_offset rescale_betas_zero_snr",
    "EulerDiscreteScheduler": _BETAS
    + (
        " prediction_type interpolation_type use_karras_sigmas use_exponential_sigmas use_beta_sigmas "
        "sigma_min sigma_max timestep_spacing timestep_type steps_offset rescale_betas_zero_snr "
        "final_sigmas_type"
    ),
    "FlowMatchEulerDiscreteScheduler": (
        "num_train_timesteps shift use_dynamic_shifting base_shift max_shift base_image_seq_len "
        "max_image_seq_len invert_sigmas shift_terminal use_karras_sigmas use_exponential_sigmas "
        "use_beta_sigmas time_shift_type stochastic_sampling"
    ),
    "HeunDiscreteScheduler": _BETAS
    + (
        " prediction_type use_karras_sigmas use_exponential_sigmas use_beta_sigmas clip_sample "
        "clip_sample_range timestep_spacing steps_offset"
    ),
    "KDPM2AncestralDiscreteScheduler": _BETAS
    + (" use_karras_sigmas use_exponential_sigmas use_beta_sigmas prediction_type timestep_spacing steps_offset"),
    "KDPM2DiscreteScheduler": _BETAS
    + (" use_karras_sigmas use_exponential_sigmas use_beta_sigmas prediction_type timestep_spacing steps_offset"),
    "LCMScheduler": _BETAS
    + (
        " original_inference_steps clip_sample clip_sample_range set_alpha_to_one steps_offset "
        "prediction_type thresholding dynamic_thresholding_ratio sample_max_value timestep_spacing "
        "timestep_scaling rescale_betas_zero_snr"
    ),
    "LMSDiscreteScheduler": _BETAS
    + (" use_karras_sigmas use_exponential_sigmas use_beta_sigmas prediction_type timestep_spacing steps_offset"),
    "PNDMScheduler": _BETAS + " skip_prk_steps set_alpha_to_one prediction_type timestep_spacing steps_offset",
    "TCDScheduler": _BETAS
    + (
        " original_inference_steps clip_sample clip_sample_range set_alpha_to_one steps_offset "
        "prediction_type thresholding dynamic_thresholding_ratio sample_max_value timestep_spacing "
        "timestep_scaling rescale_betas_zero_snr"
    ),
    "UniPCMultistepScheduler": _BETAS
    + (
        " solver_order prediction_type thresholding dynamic_thresholding_ratio sample_max_value predict_x0 "
        "solver_type lower_order_final disable_corrector solver_p use_karras_sigmas "
        "use_exponential_sigmas use_beta_sigmas use_flow_sigmas flow_shift timestep_spacing steps_offset "
        "final_sigmas_type rescale_betas_zero_snr use_dynamic_shifting time_shift_type sigma_min "
        "sigma_max shift_terminal"
    ),
}

OPTIONS: dict[str, frozenset[str]] = {name: frozenset(text.split()) for name, text in _OPTIONS.items()}
