"""qwenrun: run quantized Qwen Mixture-of-Experts models locally, with experts placed for speed.

Importing the package is cheap: it pulls in no third-party module. The heavy parts
(llama.cpp, huggingface_hub, NVML) load only in the commands that need them.
"""

__version__ = "0.1.0"
