-- slm.json: the project's own lua-cjson instance, so our settings never
-- change the caller's cjson module.
local cjson = require("cjson").new()
cjson.encode_max_depth(64)
cjson.decode_max_depth(128)
-- keep numbers exact enough for seeds, ids and prices
cjson.encode_number_precision(14)
return cjson
