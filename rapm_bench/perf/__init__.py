"""Performance: `rapm-bench bench`, the scaling measurement and the engine's own timings (issue 15, item 5).

- config: BenchConfig, its stages' dataclasses, the presets, resolve_bench / validate, the RAPM variants
- measure: Measurement, measure, count_flops, the peak table, sync / free_memory
- sdxl: the one random-weight SDXL builder (sizes tiny, small, full), save_pipeline, the offline tokenizer
- worlds: RandomSDXLWorld, TunedWorld and the optimisations they apply, build_world
- stages, stages_eval: the stage functions (stages_eval: eval-features, vae-precision, feature-precision)
- report: estimates, goals, run_bench (the result JSON), summary
- scaling, scaling_build: `rapm-bench scaling` (1 vs G GPUs; scaling_build: its settings and what it builds)
- engine, profile: the distillation engine timed on itself

Only cli.py imports this package, and the compatibility modules rapm_bench.bench and rapm_bench.scaling
(their old import paths); provenance (versions, commit, device) is rapm_bench.provenance.
"""
