"""Vendor adapters: implementations of the core's ports on third-party SDKs and runtimes.

The core (``pipeline``) defines what it needs; these modules implement it with a vendor's SDK
(OpenAI, Anthropic) or runtime (onnxruntime). Only the composition root (``app``) imports them.
"""
