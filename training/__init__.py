"""Training a ControlNet (arXiv 2302.05543, section 3.3 and the Fill50K tutorial). Work in progress: the data side.

Pure numpy / Pillow / torch; never imports ComfyUI (the host's frozen UNet will come through ``nodes/patcher.py``).
"""
