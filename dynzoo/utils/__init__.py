"""Counting and metrics: MACs / FLOPs (``flops``) and the dynamic-convolution metrics IES / RCS (``metrics``)."""
