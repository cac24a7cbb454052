"""A tiny text-to-image demo: procedural shapes data (`shapes`) and a deterministic judge of prompt adherence
(`analyze`)."""
