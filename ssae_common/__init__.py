"""ssae_common: the library behind the ssae command-line tools, usable from Python on its own.

One package per stage, each with a light `config.py` (the options, declared once) and a `stage.py`
(the entry point the tool calls):

    core       errors, records, outputs, provenance, progress, signals, run context, option fields
    data       documents -> activations      HarvestConfig, harvest(), merge()      ssae-harvest
    sae        activations -> SAE            FitConfig, fit()                       ssae-fit
    retrieval  seeds + corpus -> documents   RetrieveConfig, retrieve()             ssae-retrieve
    eval       SAEs + test text -> metrics   EvalConfig, evaluate_saes()            ssae-eval, ssae-tables
    explain    SAE + activations -> labels   ExplainConfig, explain()               ssae-explain
    shift      SAEs + bios -> SHIFT report   ShiftConfig, shift()                   ssae-shift

Stages import core and the stages upstream of them, never the command-line tools (ssae_tools).
"""

__version__ = "0.1.0"
