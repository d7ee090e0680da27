def cmd_run(args, ctx): raise NotImplementedError
