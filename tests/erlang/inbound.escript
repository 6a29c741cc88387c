#!/usr/bin/env escript
%% Drives evrhost's Erlang front-end as an Erlang application drives
%% FreeSWITCH's mod_erlang_event: every inbound example of the seed
%% document. Usage: inbound.escript SELF EVRHOST COOKIE shortnames|longnames
%% Prints one "ok NAME" line per check; any mismatch crashes (exit 127).
-mode(compile).

main([Self, Evr, Cookie, Names]) ->
    {ok, _} = net_kernel:start([list_to_atom(Self), list_to_atom(Names)]),
    erlang:set_cookie(node(), list_to_atom(Cookie)),
    N = list_to_atom(Evr),
    Fs = {foo, N},
    %% Handlers are linked: trap the exit the node's going away sends.
    process_flag(trap_exit, true),

    Fs ! {api, status, ""},
    {ok, "UP " ++ _} = recv(),
    ok("api status"),

    Fs ! {api, wtf, ""},
    {error, "wtf: Command not found!\n"} = recv(),
    ok("api unknown"),

    Fs ! {api, 'kvcount.get', <<"nothing">>},
    {ok, "0"} = recv(),
    ok("api plugin command"),

    %% As mod_erlang_event decodes it, the command is an atom.
    Fs ! {api, "status", ""},
    {error, badarg} = recv(),
    Fs ! {api, <<"status">>, ""},
    {error, badarg} = recv(),
    ok("api command as text"),

    Fs ! {api, echo, "hello there"},
    {ok, "hello there"} = recv(),
    ok("api echo"),

    Fs ! {bgapi, no_such_cmd, ""},
    {ok, Job0} = recv(),
    {bgerror, Job0, "no_such_cmd: Command not found!\n"} = recv(),
    ok("bgapi unknown command"),

    Fs ! {fetch_reply, "not-a-fetch-of-ours", "<document/>"},
    {error, invalid_uuid} = recv(),
    ok("fetch_reply unknown"),

    Fs ! {bgapi, status, ""},
    {ok, Job} = recv(),
    {bgok, Job, "UP " ++ _} = recv(),
    ok("bgapi"),

    Fs ! getpid,
    {ok, Pid} = recv(),
    true = is_pid(Pid),
    N = node(Pid),
    ok("getpid"),

    Fs ! register_event_handler,
    ok = recv(),
    Fs ! {event, 'CUSTOM', 'test::one', 'test::two'},
    ok = recv(),
    Fs ! {event},
    {error, badarg} = recv(),
    Fs ! {sendevent, 'CUSTOM', 'test::one', [{"Who", "alice"}, {"body", "hello"}]},
    ok = recv(),
    {event, [undefined | Headers]} = recv(),
    "alice" = proplists:get_value("Who", Headers),
    "CUSTOM" = proplists:get_value("Event-Name", Headers),
    "test::one" = proplists:get_value("Event-Subclass", Headers),
    "hello" = proplists:get_value("body", Headers),
    ok("events"),

    Fs ! {filter, 'Who -mallory', 'add Who alice', 'delete'},
    {filter_command_processing_log, [{"added", "Who", "-mallory"}, {"added", "Who", "alice"}, '-ERR invalid syntax']} = recv(),
    Fs ! {sendevent, 'CUSTOM', 'test::two', [{"Who", "mallory"}]},
    ok = recv(),
    Fs ! {sendevent, 'CUSTOM', 'test::two', [{"Who", "bob"}]},
    ok = recv(),
    {event, [undefined | H2]} = recv(),
    "bob" = proplists:get_value("Who", H2),
    ok("filters"),

    Fs ! {nixevent, 'CUSTOM', 'test::two'},
    ok = recv(),
    Fs ! {sendevent, 'CUSTOM', 'test::two', [{"Who", "carol"}]},
    ok = recv(),
    nothing = recv(300),
    Fs ! noevents,
    ok = recv(),
    ok("nixevent noevents"),

    Fs ! {sendevent, 'HEARTBEAT', []},
    {error, badarg} = recv(),
    ok("sendevent reserved"),

    Fs ! register_log_handler,
    ok = recv(),
    Fs ! {set_log_level, info},
    ok = recv(),
    Fs ! {set_log_level, loud},
    {error, badarg} = recv(),
    Fs ! {api, 'plugin.reload', "kvcount"},
    {ok, "+OK kvcount reloaded" ++ _} = recv(),
    {log, Log} = recv_log("reload"),
    6 = proplists:get_value(level, Log),
    true = is_integer(proplists:get_value(line, Log)),
    Fs ! {api, log, "warning hello from erlang"},
    ok = api_log("hello from erlang", false, false),
    Fs ! nolog,
    ok = recv(),
    drain(),
    ok("log handler"),

    Fs ! {api, erlang, "listeners"},
    {ok, Listeners} = recv(),
    {match, _} = re:run(Listeners, atom_to_list(node())),
    ok("erlang listeners"),

    Fs ! {whatever, 1},
    {error, undef} = recv(),
    Fs ! some_atom,
    {error, undef} = recv(),
    Fs ! [1, 2, 3],
    {error, undef} = recv(),
    Fs ! {api, status, [104, 1000]},
    {error, badarg} = recv(),
    Fs ! {sendmsg, "d9189508", [{"call-command", "hangup"}]},
    {error, nosession} = recv(),
    ok("bad terms"),

    {ok, "evrhost " ++ _} = gen_server:call({rex, N}, {call, evrhost, api, [version, ""], user}),
    {badrpc, {'EXIT', {undef, _}}} = gen_server:call({rex, N}, {call, lists, reverse, [[1]], user}),
    ok("rex"),

    {ok, "UP " ++ _} = rpc:call(N, evrhost, api, [status, ""]),
    {ok, Pid} = rpc:call(N, freeswitch, getpid, []),
    {badrpc, {'EXIT', {undef, _}}} = rpc:call(N, lists, reverse, [[1]]),
    ok("rpc:call"),

    pong = net_adm:ping(N),
    ok("ping"),

    Fs ! exit,
    ok = recv(),
    ok("exit"),
    %% The link made by register_event_handler reports the connection's end.
    {'EXIT', _, noconnection} = recv(),
    ok("linked"),
    halt(0).

recv() -> recv(3000).
recv(T) -> receive X -> X after T -> nothing end.

%% Log lines until one mentions Word.
recv_log(Word) ->
    case recv() of
        {log, L} = Log ->
            case string:find(proplists:get_value(data, L), Word) of
                nomatch -> recv_log(Word);
                _ -> Log
            end;
        Other -> error({expected_log, Other})
    end.

%% The `log` command's answer and the log line it wrote, in either order.
api_log(_, true, true) -> ok;
api_log(Word, Answered, Logged) ->
    case recv() of
        {ok, "+OK"} -> api_log(Word, true, Logged);
        {log, L} ->
            case string:find(proplists:get_value(data, L), Word) of
                nomatch -> api_log(Word, Answered, Logged);
                _ -> 4 = proplists:get_value(level, L), api_log(Word, Answered, true)
            end;
        Other -> error({expected_log_or_answer, Other})
    end.

drain() -> receive _ -> drain() after 200 -> ok end.

ok(Name) -> io:format("ok ~s~n", [Name]).
