"""Getting what a bare GPU machine lacks onto it in the fewest bytes (bench/wheelhouse.sh, bench/gpu.sh).

fatbin.py   keep only the GPU code one SM architecture can load in a CUDA shared library
weights.py  a model's graph without its large random weights, and the weights drawn again there
bundle.py   deterministic tar.xz archives split into parts that fit one device call each
"""
