/* sse.c - placeholder until the real implementation lands. */
#include "slm.h"
int slm_open_sse(lua_State *L) { (void)L; return 0; }
