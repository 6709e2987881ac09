"""The MobileMoE shapes this project designed before the release (202,048 vocab, 3:1
local/global attention, softmax routing, 64-72 experts). Kept because the architecture
search (docs/scaling.md, configs/searched/) and the benchmark records (bench/README.md) were
made with them; the released shapes are configs/mobilemoe_{s,m,l}.py."""
