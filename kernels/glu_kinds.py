"""The gated activations' kind numbers, one source for the Triton kernels (kernels/glu.py), the op
(fastnlg/ops/glu.py) and the C++ kernels (csrc/cpu/fastnlg_cpu.h keeps the same numbers; a test compares
them with the values fastnlg._C exports). Pure Python: importable without triton."""
SWIGLU, GEGLU_TANH, GEGLU_ERF = 0, 1, 2
