"""Model code shared by the components: loading, the sampler, the demo-model builds, vLLM support."""
