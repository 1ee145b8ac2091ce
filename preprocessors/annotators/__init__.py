"""Weight-based annotators (HED, PiDiNet, lineart, M-LSD, MiDaS, Depth Anything v2, OpenPose), host-free."""
