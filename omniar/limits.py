"""Hard upper bounds on sizes read from configs and model folders.

A ``config.json``, ``model_index.json`` or training config is data: it must not be able to make
omniar allocate without bound before any other check runs. Every value below is far above what
the shipped models and configs use; raising one is a code change, never a file edit.
"""

# VideoTokenizer and OmniARConfig
MAX_CHANNELS = 4096  # any conv or hidden width, latent/code dimension
MAX_BLOCKS = 64  # residual / refinement blocks per stage
MAX_CODEBOOK_SIZE = 65536
MAX_SCALE = 128  # largest code map side (the latent grid)
MAX_TEXT_VOCAB = 1 << 20
MAX_LAYERS = 128
MAX_HEADS = 128
MAX_EXPERTS = 256
MAX_MTP_K = 16

# TextToVideoPipeline (model_index.json)
MAX_BATCH_SIZE = 64
MAX_NUM_FRAMES = 257
MAX_LONG_NUM_FRAMES = 1025  # a call with a kv_budget: its memory does not grow with the clip
MAX_TEXT_LEN = 4096

# training configs
MAX_MICRO_BATCH_SIZE = 4096
MAX_NUM_WORKERS = 64
MAX_SEED = 2**64 - 1  # torch.Generator's seed range
