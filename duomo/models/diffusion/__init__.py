"""The diffusion family: text-to-image denoisers (a diffusion Transformer, the Stable Diffusion UNet), the KL
autoencoder, noise schedules and samplers. Modules are imported directly (`duomo.models.diffusion.dit`)."""
