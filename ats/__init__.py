"""ats: adaptive timestep schedules for few-step sampling of pretrained diffusion models."""
__version__ = "0.1.0"
