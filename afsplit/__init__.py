"""afsplit: attention-FFN disaggregated Mixture-of-Experts inference."""

__version__ = "0.1.0"


def __getattr__(name):  # lazy: `import afsplit` stays cheap (no torch import for the CLI's --help)
    if name in ("LLM", "SamplingParams"):
        from afsplit import llm, sampling_params

        return {"LLM": llm.LLM, "SamplingParams": sampling_params.SamplingParams}[name]
    raise AttributeError(name)
