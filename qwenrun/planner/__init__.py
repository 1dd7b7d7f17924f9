"""The offload planner, the whole of it; its public face is `qwenrun.offload`, whose
docstring maps which module here decides what. From the user's settings (`wishes`) and a
model's quants (`sources`, `options`, `facts`, `recipes`, `factcache`), one plan is decided
(`decide`): the quant (`policy`), the devices' budgets (`targets`, `budget`), the search over
contexts and placements (`search`, `spread` over several devices), what llama.cpp allocates
(`costs`), how fast it runs (`speed`, `spreadspeed`), what `qwenrun bench` measured
(`measured`), the result (`result`) and its words (`explain`); also `qwenrun plan MODEL` and
the quant a pull takes (`reference`), and the default model (`defaults`)."""
