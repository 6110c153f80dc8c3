// Emulation stand-in for the CUDA header of this name (see emu.h).
#pragma once
#include "emu.h"
