"""Synthetic Qwen GGUFs: tiny random-weight models that the pinned llama.cpp loads and runs.

Production code uses them too (the CPU-kernel check in `engine/crash.py` decodes one in a child
process; `template.fallback_template` reads Qwen3's template from `templates/`), so they live
outside `qwenrun.testing`, which is the test kit alone. The tests and the benchmarks use the
same writers.
"""
