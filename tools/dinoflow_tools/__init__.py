"""dinoflow's tooling, outside the library: benchmarks (``bench``), the uncurated demo pool with
planted copies and its ground truth (``pool``, ``scoring``) and the image builder (``images``)."""
