"""The diffusers engine: UNet text-to-image pipelines, each request's rows with its own attention
plan (interventions, PAG and SoftPAG) through attention.core."""
